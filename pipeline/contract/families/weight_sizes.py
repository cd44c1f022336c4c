"""How big each part of a model is, read from its files' headers: no weights loaded, no torch.

A `.safetensors` header lists every tensor's dtype and shape, so a model's parameter
count and bytes per component (denoiser, text encoders, VAE) cost a few kilobytes of
reading. The memory planner (`memory_plan.py`) starts from these numbers.

- a diffusers folder: each component folder's `*.safetensors` (sharded or not) summed;
- a single-file checkpoint (A1111/Civitai/ComfyUI): split by key prefix;
- a GGUF file (city96/ComfyUI-GGUF): the denoiser as stored (quantised bytes), read
  with the `gguf` package (numpy only).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

# bytes per element of each safetensors dtype
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
_DTYPE_NAMES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F8_E4M3": "fp8", "F8_E5M2": "fp8"}

# What diffusers' layerwise casting never stores in fp8, whatever the model
# (diffusers.hooks.layerwise_casting.DEFAULT_SKIP_MODULES_PATTERN); families add theirs.
DEFAULT_SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")

DENOISERS = ("transformer", "unet")

# Single-file checkpoints: key prefix → component (first match wins; the rest is the
# denoiser). The layout's shared parts; each family adds its text encoders' prefixes
# (`FamilySpec.single_file_text_encoders`).
_SINGLE_FILE_PARTS = (
    ("model.diffusion_model.", "unet"),
    ("first_stage_model.", "vae"),
    ("vae.", "vae"),
)


@functools.cache
def single_file_prefixes() -> tuple[tuple[str, str], ...]:
    from pipeline.contract.families.base import text_encoder_component
    from pipeline.contract.families.registry import FAMILIES

    prefixes = list(_SINGLE_FILE_PARTS)
    for spec in FAMILIES.values():
        encoders = spec.single_file_text_encoders
        prefixes += [(p, text_encoder_component(i)) for i, p in enumerate(encoders)]
    return tuple(dict.fromkeys(prefixes))


# The GGUF tensor types diffusers 0.42 reads (quantizers/gguf/utils.py, plus F32/F16 as
# plain tensors); tests/test_gguf.py checks this list against diffusers' own.
READABLE_GGUF = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                 "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")  # fmt: skip

_BLOCK = re.compile(r"^([^.]+)\.(\d+)\.")
# The layer whose output width is the denoiser's width (UNet, diffusers and original
# transformer layouts), and the VAE decoder's last conv (its input width).
_INPUT_LAYERS = ("conv_in.weight", "input_blocks.0.0.weight", "x_embedder.weight",
                 "img_in.weight", "all_x_embedder.2-1.weight")  # fmt: skip
_VAE_OUTPUT = ("decoder.conv_out.weight", "decoder.head.2.weight")


@dataclass(frozen=True)
class ComponentSize:
    """One component's weights. `fp8_params` are those diffusers' layerwise casting
    would store in fp8 (the rest stays in the compute dtype); `block_params` is the
    largest element of a top-level block list (what group offloading moves at once)
    and `loose_params` what lies outside those lists (kept with the current block)."""

    name: str  # the diffusers folder name: unet, transformer, text_encoder…, vae
    params: int
    stored_bytes: int
    stored_dtype: str  # bf16 | fp16 | fp32 | fp8 | gguf-Q8_0 …
    fp8_params: int = 0
    block_params: int = 0
    loose_params: int = 0
    largest_tensor: int = 0  # params of the largest single tensor
    width: int = 0  # channels of its first (denoiser) or last (VAE) layer; 0 = unknown

    @property
    def role(self) -> str:
        if self.name in DENOISERS:
            return "denoiser"
        return "vae" if self.name == "vae" else "text_encoder"


def safetensors_header(path: Path) -> dict[str, dict]:
    """The JSON header of a .safetensors file (name → {dtype, shape, data_offsets}),
    `__metadata__` dropped. Raises ValueError for a file that is not one."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("file too short")
        size = int.from_bytes(raw, "little")
        if size > min(100_000_000, Path(path).stat().st_size - 8):
            raise ValueError(f"header claims {size} bytes")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    return header


def size_of(
    name: str,
    tensors: Mapping[str, tuple[str, Sequence[int]]],
    skip_patterns: Iterable[str] = (),
) -> ComponentSize:
    """A component's size from its tensors (name → (safetensors dtype, shape))."""
    patterns = tuple(DEFAULT_SKIP_PATTERNS) + tuple(skip_patterns)
    castable = _castable_modules(tensors, patterns)
    params = stored = fp8 = loose = largest = 0
    blocks: dict[str, int] = {}
    dtypes: dict[str, int] = {}
    for key, (dtype, shape) in tensors.items():
        count = prod(shape)
        params += count
        stored += count * DTYPE_BYTES.get(dtype, 2)
        dtypes[dtype] = dtypes.get(dtype, 0) + count
        largest = max(largest, count)
        if key.rpartition(".")[0] in castable:
            fp8 += count
        if match := _BLOCK.match(key):
            blocks[match.group(0)] = blocks.get(match.group(0), 0) + count
        else:
            loose += count
    main = max(dtypes, key=dtypes.get) if dtypes else "F16"
    return ComponentSize(
        name=name,
        params=params,
        stored_bytes=stored,
        stored_dtype=_DTYPE_NAMES.get(main, main.lower()),
        fp8_params=fp8,
        block_params=max(blocks.values(), default=0),
        loose_params=loose,
        largest_tensor=largest,
        width=_width(name, tensors),
    )


def _width(name: str, tensors: Mapping[str, tuple[str, Sequence[int]]]) -> int:
    if name == "vae":
        shape = next((tensors[k][1] for k in _VAE_OUTPUT if k in tensors), None)
        return int(shape[1]) if shape is not None and len(shape) > 1 else 0
    shape = next((tensors[k][1] for k in _INPUT_LAYERS if k in tensors), None)
    return int(shape[0]) if shape is not None else 0


def _castable_modules(tensors: Mapping[str, tuple[str, Sequence[int]]], patterns) -> set[str]:
    """Modules layerwise casting stores in fp8: those with a ≥2-D weight (Linear, Conv,
    Embedding; norms have 1-D weights) and no path prefix matching a skip pattern
    (diffusers tests each prefix as it walks the tree)."""
    modules = set()
    for key, (_, shape) in tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf != "weight" or len(shape) < 2:
            continue
        parts = module.split(".")
        prefixes = (".".join(parts[: i + 1]) for i in range(len(parts)))
        if not any(re.search(p, prefix) for prefix in prefixes for p in patterns):
            modules.add(module)
    return modules


def header_tensors(paths: Iterable[Path]) -> dict[str, tuple[str, list[int]]]:
    """Every tensor's (dtype, shape) in these .safetensors files (shards of one component)."""
    tensors: dict[str, tuple[str, list[int]]] = {}
    for path in paths:
        for key, info in safetensors_header(path).items():
            tensors[key] = (info["dtype"], list(info["shape"]))
    return tensors


def folder_sizes(folder: Path, skip_patterns: Iterable[str] = ()) -> tuple[ComponentSize, ...]:
    """Per component folder of a diffusers model folder (those with safetensors files)."""
    sizes = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(sub.glob("*.safetensors"))
        if not files:
            continue
        skip = skip_patterns if sub.name in DENOISERS else ()
        sizes.append(size_of(sub.name, header_tensors(files), skip))
    return tuple(sizes)


def single_file_sizes(path: Path, skip_patterns: Iterable[str] = ()) -> tuple[ComponentSize, ...]:
    """A single-file checkpoint split into components by key prefix."""
    parts: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for key, (dtype, shape) in header_tensors([path]).items():
        name, local = _component_of(key)
        parts.setdefault(name, {})[local] = (dtype, shape)
    return tuple(
        size_of(name, tensors, skip_patterns if name in DENOISERS else ())
        for name, tensors in sorted(parts.items())
    )


def _component_of(key: str) -> tuple[str, str]:
    for prefix, name in single_file_prefixes():
        if key.startswith(prefix):
            return name, key[len(prefix) :]
    return "transformer", key  # a denoiser-only file (Flux/Z-Image/Qwen transformers)


def gguf_sizes(path: Path) -> ComponentSize:
    """A GGUF denoiser file: parameters from the shapes, bytes as quantised.
    Needs the `gguf` package (numpy only)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    params = stored = largest = 0
    kinds: dict[str, int] = {}
    for tensor in reader.tensors:
        count = int(prod(int(n) for n in tensor.shape))
        params += count
        stored += int(tensor.n_bytes)
        largest = max(largest, count)
        kinds[tensor.tensor_type.name] = kinds.get(tensor.tensor_type.name, 0) + count
    main = max(kinds, key=kinds.get) if kinds else "F16"
    return ComponentSize(
        name="transformer",
        params=params,
        stored_bytes=stored,
        stored_dtype=f"gguf-{main}",
        largest_tensor=largest,
        loose_params=params,
    )


def gguf_problem(path: Path) -> str:
    """One line when the GGUF file holds a quantisation diffusers cannot read, else ""."""
    from gguf import GGUFReader

    kinds = {t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    unreadable = sorted(kinds - set(READABLE_GGUF))
    if not unreadable:
        return ""
    return (
        f"model file {Path(path).name}: GGUF quantisation {', '.join(unreadable)} cannot be "
        f"read by diffusers (it reads {', '.join(READABLE_GGUF[3:])}); use a Q8_0, Q6_K, "
        "Q5_K or Q4_K file of the same model"
    )


def model_sizes(source: str, skip_patterns: Iterable[str] = ()) -> tuple[ComponentSize, ...]:
    """The components of a local model source; () when it cannot be read here (a Hub id
    not downloaded, a .ckpt pickle): the planner then uses the family's published sizes."""
    path = Path(source)
    try:
        if path.is_dir():
            return folder_sizes(path, skip_patterns)
        if path.suffix == ".safetensors" and path.is_file():
            return single_file_sizes(path, skip_patterns)
        if path.suffix == ".gguf" and path.is_file():
            return (gguf_sizes(path),)
    except (OSError, ValueError, KeyError):
        return ()
    return ()
