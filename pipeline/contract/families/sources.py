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

from pipeline.contract.families.registry import DEFAULT, family_from_index, family_from_keys

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


class ModelError(Exception):
    """A model that cannot be loaded; the message names the source and what was tried."""


def detect_family(source: str) -> str:
    """The family's name (`sd1`, `sdxl`) from a folder's model_index.json, a single
    file's keys, or a Hub id's cached model_index.json. Raises ModelError when the
    source cannot be read."""
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
    if path.suffix != ".safetensors":
        return DEFAULT.name  # .ckpt: pickles; don't open them just to guess
    try:
        keys = safetensors_keys(path)
    except ValueError as exc:
        raise ModelError(f"model file {path} is not a valid .safetensors file ({exc})") from None
    return family_from_keys(keys)


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a .safetensors file's JSON header, read without torch.
    Raises ValueError."""
    from pipeline.contract.weight_sizes import safetensors_header

    return list(safetensors_header(path))


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
