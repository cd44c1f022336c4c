"""Which family a model source is, read from its files without torch: a folder's
model_index.json, a single file's tensor names, a Hub id's cached model_index.json.
Each family's own test is in its module (`sd1.py`, `sdxl.py`); the order they are
tried in is `registry.FAMILIES`.

Torch-free so the bot can ask it (training resolution, /train's defaults) and the
workers share the answer and its errors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.contract.families.registry import DEFAULT, family_from_index, family_from_keys
from pipeline.contract.families.weight_sizes import safetensors_header

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".gguf")


class ModelError(Exception):
    """A model that cannot be loaded; the message names the source and what was tried."""


def detect_family(source: str) -> str:
    """The family's name (`sd1`, `sdxl`, `flux`) from a folder's model_index.json, a single
    file's keys (a GGUF's too), or a Hub id's cached model_index.json. Raises ModelError
    when the source cannot be read."""
    path = Path(source)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise ModelError(
                f"model folder {source} has no model_index.json; it is not a diffusers model folder"
            )
        return family_from_index(json.loads(index.read_text()))
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.exists():
            raise ModelError(f"model file {source} does not exist")
        return family_from_checkpoint(path)
    try:
        from huggingface_hub import hf_hub_download

        index = hf_hub_download(source, "model_index.json")
    except Exception as exc:  # noqa: BLE001 - any failure means "can't tell"
        raise hub_error(source, exc) from None
    return family_from_index(json.loads(Path(index).read_text()))


def family_from_checkpoint(path: Path) -> str:
    if path.suffix == ".gguf":
        return family_from_gguf(path)
    if path.suffix != ".safetensors":
        return DEFAULT.name  # .ckpt: pickles; don't open them just to guess
    try:
        keys = safetensors_keys(path)
    except ValueError as exc:
        raise ModelError(f"model file {path} is not a valid .safetensors file ({exc})") from None
    return family_from_keys(keys)


def family_from_gguf(path: Path) -> str:
    """A GGUF file's family from its tensor names (city96's ComfyUI-GGUF files keep the
    checkpoint's names and write `general.architecture`, e.g. "flux"). A GGUF no family
    claims is refused: it is a transformer file of a model this bot does not run."""
    from pipeline.contract.families.registry import FAMILIES

    try:
        architecture, keys = gguf_tensor_names(path)
    except ValueError as exc:
        raise ModelError(f"model file {path} is not a valid GGUF file ({exc})") from None
    for family in FAMILIES.values():
        if family.matches_checkpoint(keys) or family.name == architecture:
            return family.name
    raise ModelError(
        f"model file {path} is a GGUF of {architecture or 'an unknown architecture'}, not a "
        "transformer of a family this bot runs (flux)"
    )


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a .safetensors file's JSON header, read without torch.
    Raises ValueError."""
    return list(safetensors_header(path))


# GGUF metadata value types (ggml's gguf.h): their sizes, 8 = string, 9 = array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_tensor_names(path: Path) -> tuple[str, list[str]]:
    """(general.architecture, tensor names) of a GGUF file, read without torch or numpy.
    Raises ValueError for a file that is not GGUF."""
    architecture, shapes = gguf_tensor_shapes(path)
    return architecture, list(shapes)


def gguf_tensor_shapes(path: Path) -> tuple[str, dict[str, list[int]]]:
    """(general.architecture, {tensor name: torch shape}) of a GGUF file, read without
    torch or numpy (the layout of ggml's docs/gguf.md: magic, version, counts,
    key/values, tensor infos; a tensor's dims are ggml's, innermost first, so the torch
    shape is their reverse). Raises ValueError for a file that is not GGUF."""
    import struct

    with open(path, "rb") as f:

        def read(fmt: str):
            size = struct.calcsize(fmt)
            raw = f.read(size)
            if len(raw) != size:
                raise ValueError("file ends inside its header")
            return struct.unpack("<" + fmt, raw)[0]

        def string() -> str:
            length = read("Q")
            if length > 1 << 20:
                raise ValueError("a header string is too long")
            return f.read(length).decode("utf-8", "replace")

        def skip(kind: int) -> Any:
            if kind == 8:
                return string()
            if kind == 9:
                item, count = read("I"), read("Q")
                for _ in range(count):
                    skip(item)
                return None
            if kind not in _GGUF_SIZES:
                raise ValueError(f"unknown metadata type {kind}")
            f.read(_GGUF_SIZES[kind])
            return None

        if f.read(4) != b"GGUF":
            raise ValueError("no GGUF magic")
        read("I")  # version
        tensors, values = read("Q"), read("Q")
        if tensors > 1_000_000 or values > 1_000_000:
            raise ValueError("implausible counts")
        architecture = ""
        for _ in range(values):
            key, kind = string(), read("I")
            value = skip(kind)
            if key == "general.architecture" and isinstance(value, str):
                architecture = value
        shapes: dict[str, list[int]] = {}
        for _ in range(tensors):
            name, dims = string(), read("I")
            if dims > 8:
                raise ValueError("implausible tensor dimensions")
            shapes[name] = [read("Q") for _ in range(dims)][::-1]
            f.read(4 + 8)  # type, offset
    return architecture, shapes


def hub_error(source: str, exc: Exception) -> ModelError:
    name = type(exc).__name__
    offline = (
        os.environ.get("HF_HUB_OFFLINE") == "1"
        or any(word in name for word in ("Connection", "Offline", "LocalEntryNotFound", "Timeout"))
        or "connect" in str(exc).lower()
    )
    if offline:
        return ModelError(
            f"model {source!r} is not in the local Hugging Face cache and the Hub cannot be "
            "reached (no network). Download it where there is network "
            "(huggingface-cli download), or set source to a local folder or .safetensors file."
        )
    if "RepositoryNotFound" in name or "404" in str(exc):
        return ModelError(f"model {source!r}: no such repository on the Hugging Face Hub")
    return ModelError(
        f"model {source!r} is neither a local folder, a .safetensors file, nor a loadable "
        f"Hub id ({name})"
    )
