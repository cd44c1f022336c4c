"""Which files of a Hugging Face Hub repository a configured model needs. Pure, no torch.

A diffusers repository holds more than one model's worth of files: the same weights in
fp32 and as an `fp16` variant, `.bin` pickles beside `.safetensors`, the original
single-file checkpoint at the root (SD 1.5: 4 and 7 GB), ONNX and Flax exports, EMA
variants, and components the bot never loads (SD 1.x's safety checker, 1.2 GB). A
download takes `model_index.json`, and of each component the family loads its configs,
tokenizer files and one set of weights: `.safetensors` (a `.bin` only where there is
none), in the `fp16` variant when the worker computes in half precision and every
component has it, else the plain files. `sdbot doctor --download` and the worker's first
load of a Hub id both ask `select_files` (pipeline/models/download.py fetches them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.contract.families import SINGLE_FILE_SUFFIXES, ModelError
from pipeline.contract.memory_plan import GiB, size_text

INDEX = "model_index.json"
# Weight formats in order of preference; the others (Flax, TF, ONNX, pickled .ckpt) are
# never fetched: diffusers' torch loaders do not read them.
LOADABLE = (".safetensors", ".bin")
NEVER = (".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".onnx_data", ".pb", ".gguf")
HALF_VARIANT = "fp16"
SHARD = re.compile(r"-\d{5}-of-\d{5}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Room kept free beside a download: the cache's own files, and the process-unique
# temporary file each download writes before moving it in place.
DISK_MARGIN = 1 << 30


def is_hub_id(source: str) -> bool:
    """A source naming a Hub repository ("org/name"), not a local folder or file."""
    path = Path(source)
    if path.exists() or path.suffix in SINGLE_FILE_SUFFIXES:
        return False
    return bool(HUB_ID.match(source)) and not source.startswith(("./", "../"))


@dataclass(frozen=True)
class Selection:
    """The files to fetch (repository path → bytes) and the weights variant they are
    ("" for the plain files, else e.g. "fp16": what `from_pretrained(variant=)` is told)."""

    files: Mapping[str, int]
    variant: str

    @property
    def total(self) -> int:
        return sum(self.files.values())


def components(index: Mapping, skip: Iterable[str] = ()) -> list[str]:
    """The component folders a `model_index.json` lists (entries `[library, class]` with a
    library: `null` entries are components a repository left out), less `skip`."""
    skipped = set(skip)
    return [
        name
        for name, value in index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and len(value) == 2
        and value[0]
        and name not in skipped
    ]


def weight_kind(path: str) -> tuple[str, str] | None:
    """(format suffix, variant) of a weights file or of a sharded weights index, else None.
    `diffusion_pytorch_model.fp16.safetensors` → (".safetensors", "fp16"); the index
    `model.safetensors.index.fp16.json` → (".safetensors", "fp16"); shards
    `model-00001-of-00002.safetensors` → (".safetensors", "")."""
    name = PurePosixPath(path).name
    if ".index" in name and name.endswith(".json"):
        stem, _, rest = name.partition(".index")
        suffix = PurePosixPath(stem).suffix
        variant = rest[1:-5] if rest.startswith(".") else ""  # ".fp16.json" → "fp16"
        return (suffix, variant) if suffix in LOADABLE else None
    suffix = PurePosixPath(name).suffix
    if suffix not in LOADABLE:
        return None
    stem = SHARD.sub("", name[: -len(suffix)])
    variant = SHARD.sub("", stem.rpartition(".")[2]) if "." in stem else ""
    return suffix, variant


def select_files(
    sizes: Mapping[str, int],
    index: Mapping,
    *,
    half: bool,
    skip: Iterable[str] = (),
    configs_only: Iterable[str] = (),
) -> Selection:
    """The files a model needs of a repository whose files are `sizes` (path → bytes):
    of `configs_only` components (those a single-file checkpoint brings the weights of)
    only their configs. Raises ModelError when a component has no weights diffusers can
    load."""
    without_weights = set(configs_only)
    chosen: dict[str, int] = {INDEX: sizes.get(INDEX, 0)}
    weights: dict[str, dict[tuple[str, str], list[str]]] = {}
    unreadable: dict[str, str] = {}  # component → a weights file of a format never fetched
    for name in components(index, skip):
        for path, size in sizes.items():
            if not path.startswith(f"{name}/"):
                continue
            kind = weight_kind(path)
            if name in without_weights and (kind is not None or path.endswith(NEVER)):
                continue
            if kind is not None:
                weights.setdefault(name, {}).setdefault(kind, []).append(path)
            elif not path.endswith(NEVER):
                chosen[path] = size  # configs, tokenizer vocabularies, processor files
            elif name not in weights:
                unreadable.setdefault(name, path)
    for name, path in unreadable.items():
        if name not in weights:
            raise ModelError(
                f"component {name} has only weights diffusers cannot load ({path}); "
                "it needs .safetensors or .bin files"
            )
    variant = _variant(weights, half)
    for name, kinds in weights.items():
        suffix = next((s for s in LOADABLE if (s, variant) in kinds), None)
        if suffix is None:
            raise ModelError(f"component {name} has no {variant or 'plain'} weights to load")
        chosen.update((path, sizes[path]) for path in kinds[(suffix, variant)])
    return Selection(dict(sorted(chosen.items())), variant)


def _variant(weights: Mapping[str, Mapping[tuple[str, str], list[str]]], half: bool) -> str:
    """The half-precision variant when the worker computes in half precision and every
    component has it (else diffusers would mix fp32 and fp16 downloads); the plain files
    when every component has them; else the half variant where it is all there is."""
    has = [{variant for _, variant in kinds} for kinds in weights.values()]
    if not has:  # configs only: no weights, no variant
        return ""
    everywhere_half = all(HALF_VARIANT in found for found in has)
    if half and everywhere_half:
        return HALF_VARIANT
    if all("" in found for found in has):
        return ""
    if everywhere_half:
        return HALF_VARIANT
    raise ModelError("the repository's components have no common set of weights (plain or fp16)")


def disk_problem(model: str, needed: int, free: int, where: str) -> str | None:
    """One line when `needed` bytes (plus a margin) do not fit in `free`, else None."""
    if needed + DISK_MARGIN <= free:
        return None
    return (
        f"model {model!r} needs {size_text(needed)} more on disk in {where}, which has "
        f"{size_text(free)} free (and {size_text(DISK_MARGIN)} is kept spare); free some "
        "space or set HF_HUB_CACHE to a folder on a larger disk"
    )


def progress_line(done: int, total: int) -> str:
    """What a member reads while the worker downloads: "downloading the model, 3.2 of
    23.8 GB"."""
    unit, scale = ("GB", GiB) if total >= GiB else ("MB", 2**20)
    return f"downloading the model, {done / scale:.1f} of {total / scale:.1f} {unit}"
