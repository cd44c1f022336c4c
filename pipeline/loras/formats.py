"""LoRA and LyCORIS files: read, check, map their keys onto the model, and compute each
layer's weight change ΔW ourselves, for every format AUTOMATIC1111 loads.

Formats (per layer, by the tensor names LyCORIS and kohya write):
  lora / locon / dylora  `lora_up`, `lora_down` (+ `lora_mid`: Tucker), `alpha`
  diffusers / peft       `lora_A`/`lora_B`, `lora.up`/`lora.down`, `lora_linear_layer.*`
  loha                   `hada_w1_a` … `hada_w2_b` (+ `hada_t1`, `hada_t2`: Tucker)
  lokr                   `lokr_w1` | `lokr_w1_a`/`_b`, `lokr_w2` | `lokr_w2_a`/`_b` (+ `lokr_t2`)
  full                   `diff` (+ `diff_b`)
  ia3                    `weight`, `on_input`
  glora                  `a1.weight`, `a2.weight`, `b1.weight`, `b2.weight` (+ `bm.weight`)
  oft (diag-OFT), boft   `oft_blocks` (3-D / 4-D), `alpha` (the constraint), `rescale`
  norm (train_norm)      `w_norm`, `b_norm` on LayerNorm / GroupNorm
  set                    `scale`: a norm's new weight (BFL's control LoRAs carry the
                         trained RMSNorm scales; diffusers replaces the norm's weight)
  + DoRA                 `dora_scale` on lora, loha and lokr layers

The forms of ΔW follow LyCORIS's published functions (lycoris/functional/*.py, Apache-2.0:
LoCon `up @ down`, Tucker `einsum(mid, up, down)`, LoHa `(w1a@w1b) ⊙ (w2a@w2b)`, LoKr
`kron(w1, w2)`, GLoRA `W@a1@a2 + b1@b2`, OFT `(R − I)·W` with the Cayley `R`, BOFT's
butterfly stages, IA3 `W·w`, DoRA's `m·(W+ΔW)/‖W+ΔW‖`), each checked against LyCORIS
itself by tests/test_lora_formats.py. A member's weight `w` scales the file's ΔW
(`W + w·ΔW`), as A1111 applies every format, DoRA and BOFT included.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.contract.families import label, lora_family, spec
from pipeline.contract.jobs import JobError, LoraRef
from pipeline.contract.safetensors_check import safetensors_problem
from pipeline.families import of_pipe
from pipeline.prompts.encoding import extract_loras

# Parameter names a layer may carry, per algorithm; the first names identify it.
_PARAMS = {
    "lora": (
        "lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_up.bias", "alpha",
        "dora_scale",
    ),
    "loha": (
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha",
        "dora_scale",
    ),
    "lokr": (
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
        "alpha", "dora_scale",
    ),
    "full": ("diff", "diff_b"),
    "ia3": ("weight", "on_input"),
    "glora": ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight", "alpha"),
    "oft": ("oft_blocks", "rescale", "alpha"),
    "norm": ("w_norm", "b_norm"),
    "set": ("scale",),
}  # fmt: skip
# diffusers/peft spellings of LoRA's two factors → kohya's.
_DIFFUSERS_SUFFIXES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
    "lora_B.bias": "lora_up.bias",  # peft's lora_bias (BFL's control LoRAs)
    "down.weight": "lora_down.weight",  # XLabs' `processor.qkv_lora1.down.weight`
    "up.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale",
    "alpha": "alpha",
}
_ALL_SUFFIXES = sorted(
    {p for params in _PARAMS.values() for p in params} | set(_DIFFUSERS_SUFFIXES),
    key=len,
    reverse=True,
)
# Algorithms A1111 knows that this bot does not apply, by a tensor name they carry.
# (T-LoRA is LyCORIS's timestep-dependent LoRA: A1111 does not load it either.)
_UNSUPPORTED_MARKS = {"lambda_layer": "T-LoRA (LyCORIS tlora)"}


class LoraError(JobError):
    """A LoRA that cannot be used. The message names it and is shown to the member."""


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read and checked, ready to load into a pipeline."""

    name: str
    path: Path
    sha256: str
    format: str  # the algorithms it uses, e.g. "lora", "loha+dora", "lokr"
    family: str | None  # what the keys say it was made for; None when they don't tell
    state_dict: dict[str, torch.Tensor]
    nbytes: int


def read_lora_file(path: str | Path, *, name: str, family: str, max_bytes: int) -> LoraFile:
    """Read a .safetensors LoRA, detect its format and family; raise LoraError if unusable."""
    path = Path(path)
    nbytes = path.stat().st_size
    if nbytes > max_bytes:
        raise LoraError(
            f"LoRA '{name}' is {nbytes / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.1f} MB"
        )
    data = path.read_bytes()
    state_dict = _load_safetensors(data, name)
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise LoraError(
            f"LoRA '{name}' is damaged: {len(bad)} tensor(s) hold NaN or infinite values "
            f"(first: {bad[0]})"
        )
    fmt = detect_format(state_dict)
    if fmt is None:
        unsupported = _unsupported_algorithm(state_dict)
        if unsupported:
            raise LoraError(f"LoRA '{name}' uses {unsupported}, which this bot cannot apply")
        raise LoraError(f"'{name}' is not a LoRA file (it has no LoRA or LyCORIS weights)")
    made_for = detect_family(state_dict)
    if made_for is not None and not spec(family).takes_loras_of(made_for):
        raise LoraError(
            f"LoRA '{name}' was made for {label(made_for)}; this model is {label(family)}"
        )
    sha = hashlib.sha256(data).hexdigest()
    return LoraFile(name, path, sha, fmt, made_for, state_dict, nbytes)


def _load_safetensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """Check the framing first (safetensors trusts the header's sizes), then load."""
    from safetensors.torch import load

    problem = safetensors_problem(data, name)
    if problem:
        raise LoraError(problem)
    try:
        return load(data)
    except Exception:  # safetensors raises its own error types for any bad content
        raise LoraError(f"'{name}' is not a LoRA file (not a readable .safetensors file)") from None


def _unsupported_algorithm(state_dict: dict[str, torch.Tensor]) -> str | None:
    for key in state_dict:
        suffix = key.rpartition(".")[2]
        if suffix in _UNSUPPORTED_MARKS:
            return _UNSUPPORTED_MARKS[suffix]
    return None


def detect_format(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The algorithms a file uses ("lora", "loha+dora", …), or None if it is no LoRA."""
    algos: set[str] = set()
    for params in _split_modules(state_dict).values():
        algo = _algorithm(params)
        if algo:
            algos.add(algo)
            if "dora_scale" in params:
                algos.add("dora")
    if not algos:
        return None
    order = ("lora", "loha", "lokr", "full", "ia3", "glora", "oft", "boft", "norm", "set", "dora")
    return "+".join(a for a in order if a in algos)


def detect_family(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The base model family a LoRA was trained on, from key names and layer widths
    (`pipeline.contract.families.lora_family`); None when they don't tell."""
    return lora_family({key: tuple(tensor.shape) for key, tensor in state_dict.items()})


def lora_hash(path: str | Path) -> str:
    """A1111's "Lora hashes" value: sha256 of the tensor data after the safetensors
    header (Civitai's AutoV3), first 12 hex digits. Other files: sha256 of the file."""
    data = Path(path).read_bytes()
    header = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    body = data[8 + header :] if 0 <= header <= len(data) - 8 else data
    return hashlib.sha256(body).hexdigest()[:12]


def resolve_lora_names(text: str, lora_dir: str | Path) -> list[tuple[LoraRef, Path]]:
    """`<lora:NAME:w>` tags → files `lora_dir/NAME.safetensors` (case-insensitive)."""
    files = {p.stem.lower(): p for p in Path(lora_dir).glob("*.safetensors")}
    resolved = []
    for name, weight in extract_loras(text)[1]:
        if not math.isfinite(weight):
            raise LoraError(f"LoRA '{name}' has weight {weight}; use a number such as 0.8")
        path = files.get(name.lower())
        if path is None:
            closest = difflib.get_close_matches(name.lower(), sorted(files), n=3, cutoff=0.4)
            hint = f"; closest: {', '.join(files[c].stem for c in closest)}" if closest else ""
            raise LoraError(f"LoRA '{name}' not found{hint}")
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        resolved.append((LoraRef(name, sha, weight), path))
    return resolved


# --- keys → layers ----------------------------------------------------------------------


def _split_key(key: str) -> tuple[str, str] | None:
    """`module.param` with a known parameter suffix → (module key, kohya parameter name)."""
    for suffix in _ALL_SUFFIXES:
        if key.endswith("." + suffix):
            module = key[: -len(suffix) - 1]
            return module, _DIFFUSERS_SUFFIXES.get(suffix, suffix)
    return None


def _split_modules(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        split = _split_key(key)
        if split is not None:
            modules.setdefault(split[0], {})[split[1]] = tensor
    return modules


def _algorithm(params: dict[str, torch.Tensor]) -> str | None:
    if "lora_up.weight" in params and "lora_down.weight" in params:
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= set(params):
        return "loha"
    if ("lokr_w1" in params or "lokr_w1_a" in params) and (
        "lokr_w2" in params or "lokr_w2_a" in params
    ):
        return "lokr"
    if "diff" in params:
        return "full"
    if "weight" in params and "on_input" in params:
        return "ia3"
    if {"a1.weight", "a2.weight", "b1.weight", "b2.weight"} <= set(params):
        return "glora"
    if "oft_blocks" in params:
        return "boft" if params["oft_blocks"].ndim == 4 else "oft"
    if "w_norm" in params:
        return "norm"
    if "scale" in params:
        return "set"
    return None


@dataclass
class LayerDelta:
    """One adapted layer of one file: its algorithm and tensors; `delta` gives ΔW."""

    algo: str
    params: dict[str, torch.Tensor]
    scalars: dict[str, float] = field(default_factory=dict)  # alpha, on_input
    # A fused layer of the file split over the model's modules (Flux.1's qkv and
    # linear1): ΔW is computed at the fused shape and these row ranges, in this order,
    # are this module's (two ranges: BFL's final layer, whose shift and scale halves
    # diffusers swaps).
    fused: tuple[tuple[tuple[int, int], ...], int] | None = None  # (row ranges, rows)

    def __post_init__(self) -> None:
        for name in ("alpha", "on_input"):
            if name in self.params:
                self.scalars[name] = float(self.params.pop(name))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.params.values())

    def to(self, device: torch.device | str) -> LayerDelta:
        params = {k: v.to(device) for k, v in self.params.items()}
        return LayerDelta(self.algo, params, dict(self.scalars), self.fused)

    def delta(
        self, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ΔW, Δbias) at weight 1, in float32, for a layer whose weight is `weight`."""
        if self.fused is not None:
            ranges, rows = self.fused
            whole = torch.zeros((rows, *weight.shape[1:]), device=weight.device)
            unfused = LayerDelta(self.algo, self.params, dict(self.scalars))
            diff, diff_b = unfused.delta(whole, None)
            diff = torch.cat([diff[start:end] for start, end in ranges])
            if diff_b is not None:
                diff_b = torch.cat([diff_b[start:end] for start, end in ranges])
            return diff, diff_b
        p: dict[str, Any] = {k: v.float() for k, v in self.params.items()}
        p.update(self.scalars)
        w = weight.float()
        diff_b = None
        if self.algo == "lora":
            diff = _lora_delta(p, w.shape)
            if "lora_up.bias" in p:  # peft's lora_bias: B's bias, scaled as B is
                diff_b = p["lora_up.bias"] * _scale(p, p["lora_down.weight"].shape[0])
        elif self.algo == "loha":
            diff = _loha_delta(p, w.shape)
        elif self.algo == "lokr":
            diff = _lokr_delta(p, w.shape)
        elif self.algo == "full":
            diff = p["diff"].reshape(w.shape)
            diff_b = p.get("diff_b")
        elif self.algo == "ia3":
            diff = _ia3_delta(p, w)
        elif self.algo == "glora":
            diff = _glora_delta(p, w)
        elif self.algo == "oft":
            diff = _oft_delta(p, w)
        elif self.algo == "boft":
            diff = _boft_delta(p, w)
        elif self.algo == "norm":  # LyCORIS train_norm: the norm's weight and bias shift
            diff = p["w_norm"].reshape(w.shape)
            diff_b = p.get("b_norm")
        elif self.algo == "set":  # the file's weight replaces the layer's: ΔW = new − W
            diff = p["scale"].reshape(w.shape) - w
        else:  # pragma: no cover - _algorithm names only the above
            raise AssertionError(self.algo)
        if "dora_scale" in p:
            diff = _dora(w, diff, p["dora_scale"])
        return diff, diff_b


def _scale(p: dict[str, Any], rank: int) -> float:
    """LyCORIS and kohya: alpha / rank; no alpha (or 0) means scale 1."""
    alpha = float(p["alpha"]) if "alpha" in p else 0.0
    return alpha / rank if alpha else 1.0


def _lora_delta(p: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    up, down = p["lora_up.weight"], p["lora_down.weight"]
    rank = down.shape[0]
    if "lora_mid.weight" in p:  # Tucker: mid carries the kernel, up/down are 1×1
        mid = p["lora_mid.weight"]
        diff = torch.einsum("i j ..., o i, j p -> o p ...", mid, up.flatten(1), down.flatten(1))
    else:
        diff = up.flatten(1) @ down.flatten(1)
    return diff.reshape(shape) * _scale(p, rank)


def _rebuild_tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    return torch.einsum("i j ..., i p, j r -> p r ...", t, wa, wb)


def _loha_delta(p: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    rank = p["hada_w1_b"].shape[0]
    if "hada_t1" in p:
        w1 = torch.einsum(
            "i j ..., j r, i p -> p r ...", p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"]
        )
        w2 = torch.einsum(
            "i j ..., j r, i p -> p r ...", p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"]
        )
    else:
        w1 = p["hada_w1_a"] @ p["hada_w1_b"]
        w2 = p["hada_w2_a"] @ p["hada_w2_b"]
    return (w1 * w2).reshape(shape) * _scale(p, rank)


def _lokr_delta(p: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        w2 = _rebuild_tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    else:
        r, o, *k = p["lokr_w2_b"].shape
        w2 = (p["lokr_w2_a"] @ p["lokr_w2_b"].reshape(r, -1)).reshape(-1, o, *k)
    if "lokr_t2" in p:  # Tucker: w2_a is (rank, out); the core is (rank, rank, k…)
        rank = p["lokr_t2"].shape[0]
    elif "lokr_w1_a" in p:
        rank = p["lokr_w1_a"].shape[1]
    elif "lokr_w2_a" in p:
        rank = p["lokr_w2_a"].shape[1]
    else:
        rank = 0  # both factors whole: LyCORIS uses scale 1, whatever alpha says
    for _ in range(w2.dim() - w1.dim()):
        w1 = w1.unsqueeze(-1)
    diff = torch.kron(w1, w2.contiguous()).reshape(shape)
    return diff * (_scale(p, rank) if rank else 1.0)


def _ia3_delta(p: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    scale = p["weight"]
    if int(p["on_input"]):
        return w * scale
    return (w.transpose(0, 1) * scale).transpose(0, 1)


def _glora_delta(p: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    a1, a2, b1, b2 = (p[f"{n}.weight"] for n in ("a1", "a2", "b1", "b2"))
    rank = a2.shape[0]
    if "bm.weight" in p:
        wb = torch.einsum(
            "m n ..., i m, n j -> i j ...", p["bm.weight"], b1.flatten(1), b2.flatten(1)
        )
    else:
        wb = (b1.reshape(b1.size(0), -1) @ b2.reshape(b2.size(0), -1)).reshape(w.shape)
    wa1, wa2 = a1.reshape(a1.size(0), -1), a2.reshape(a2.size(0), -1)
    if w.dim() > 2:
        w_a = torch.einsum("o i ..., i j -> o j ...", w, wa1)
        w_a = torch.einsum("o i ..., i j -> o j ...", w_a, wa2)
    else:
        w_a = (w @ wa1) @ wa2
    return (wb + w_a) * _scale(p, rank)


def _cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ with Q = B − Bᵀ, Q's norm capped at `constraint` (> 0)."""
    eye = torch.eye(blocks.shape[-1], device=blocks.device)
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.norm(q) + 1e-8
        if norm > constraint:
            q = q * constraint / norm
    return (eye + q) @ (eye - q).inverse()


def _oft_delta(p: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    blocks = p["oft_blocks"]
    r = _cayley(blocks, float(p["alpha"]) if "alpha" in p else 0.0)
    num, size, _ = blocks.shape
    _, *rest = w.shape
    eye = torch.eye(size, device=blocks.device)
    org = w.reshape(num, size, *rest)
    diff = torch.einsum("k n m, k n ... -> k m ...", r - eye, org).reshape(w.shape)
    if "rescale" in p:
        rescale = p["rescale"]
        diff = rescale * diff + (rescale - 1) * w
    return diff


def _boft_delta(p: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    blocks = p["oft_blocks"]
    m, _, b, _ = blocks.shape
    r = _cayley(blocks, float(p["alpha"]) if "alpha" in p else 0.0)
    half = b // 2
    x = w
    for i in range(m):
        k = 2**i * half
        x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        x = torch.einsum("b i j, b j ... -> b i ...", r[i], x)
        x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    if "rescale" in p:
        x = x * p["rescale"]
    return x - w


def _dora(w: torch.Tensor, diff: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA: W' = m · (W + ΔW) / ‖W + ΔW‖ (norm per output row, or per input column when
    the magnitude has the input's shape); returns W' − W."""
    merged = w + diff
    dims = merged.dim() - 1
    if magnitude.shape[0] == merged.shape[0] and (merged.shape[0] != 1 or dims == 0):
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
        norm = norm.reshape(merged.shape[0], *[1] * dims)
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * dims).transpose(0, 1)
    norm = norm + torch.finfo(merged.dtype).eps
    return merged * (magnitude.reshape(norm.shape) / norm) - w


# --- file → layers of a pipeline ------------------------------------------------------


@dataclass
class MappedLora:
    """A file's layers mapped onto a pipeline: (model attr, module path) → LayerDelta."""

    layers: dict[tuple[str, str], LayerDelta]
    unmatched: list[str]  # the file's module keys that fit no layer of this model
    total: int  # layers in the file


def map_lora(lora: LoraFile, pipe: Any) -> MappedLora:
    """Map every layer of the file onto the pipeline's modules; check shapes."""
    shapes = {k: tuple(v.shape) for k, v in lora.state_dict.items()}
    refusal = of_pipe(pipe).lora_refusal(pipe, lora.name, shapes)
    if refusal:
        raise LoraError(refusal)
    state_dict = _to_diffusers_unet_names(lora.state_dict, pipe)
    modules = _split_modules(state_dict)
    lookup = _module_lookup(pipe)
    layers: dict[tuple[str, str], LayerDelta] = {}
    # Tensors no known format names: each unknown module counts as a layer left out.
    unknown = sorted({k.partition(".")[0] for k in state_dict if _split_key(k) is None})
    unknown = [m for m in unknown if m not in modules]
    unmatched = list(unknown)
    fused = of_pipe(pipe).fused_lora_layers(pipe)
    for key, params in modules.items():
        algo = _algorithm(params)
        renamed = fused.get(key, [])
        if len(renamed) == 1 and renamed[0][2] is None:  # one module, another name
            key, fused_parts = renamed[0][0], None
        else:
            fused_parts = renamed or None
        if algo is not None and fused_parts:  # one layer of the file, several of ours
            rows = max(end for _, _, end in fused_parts)
            ranges: dict[str, list[tuple[int, int]]] = {}
            for name, start, end in fused_parts:
                ranges.setdefault(name, []).append((start, end))
            targets = {name: lookup.get(name) for name in ranges}
            split = {
                t[:2]: (LayerDelta(algo, dict(params), fused=(tuple(ranges[n]), rows)), t[2])
                for n, t in targets.items()
                if t is not None
            }
            if len(split) == len(ranges) and all(_fits(d, m) for d, m in split.values()):
                layers.update({where: d for where, (d, _) in split.items()})
            else:
                unmatched.append(key)
            continue
        target = lookup.get(key)
        if algo is None or target is None:
            unmatched.append(key)
            continue
        model_name, path, module = target
        delta = LayerDelta(algo, dict(params))
        if not _fits(delta, module):
            unmatched.append(key)
            continue
        layers[(model_name, path)] = delta
    return MappedLora(layers, unmatched, len(modules) + len(unknown))


def _fits(delta: LayerDelta, module: nn.Module) -> bool:
    """Shapes only: ΔW computed on the meta device (no memory, no arithmetic)."""
    weight = module.weight
    try:
        meta = delta.to(torch.device("meta"))
        diff, diff_b = meta.delta(torch.empty(weight.shape, device="meta"), None)
    except (RuntimeError, ValueError, IndexError, KeyError, NotImplementedError):
        return False
    if diff.shape != weight.shape:
        return False
    bias = getattr(module, "bias", None)
    return diff_b is None or (bias is not None and diff_b.shape == bias.shape)


ADAPTABLE = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _module_lookup(pipe: Any) -> dict[str, tuple[str, str, nn.Module]]:
    """Every name a file may use for a Linear/Conv2d → (model attr, module path, module).

    kohya/A1111 names (dots → underscores; text encoders under `text_model`, as
    transformers 4 named them and every A1111-era file has them) and diffusers names
    (`unet.<path>`, `text_encoder.<path>`), with and without `text_model`.
    """
    family = of_pipe(pipe)
    prefixes = family.lora_prefixes
    lookup: dict[str, tuple[str, str, nn.Module]] = {}
    for model_name, model in family.adaptable(pipe):
        for path, module in model.named_modules():
            if not isinstance(module, ADAPTABLE):
                continue
            target = (model_name, path, module)
            paths = [path]
            if model_name != family.denoiser_name:
                paths.append(
                    path[len("text_model.") :]
                    if path.startswith("text_model.")
                    else f"text_model.{path}"
                )
            for name in paths:
                lookup[prefixes[model_name] + name.replace(".", "_")] = target
                lookup[f"{model_name}.{name}"] = target
    return lookup


# SGM (original Stability) names inside a UNet block → diffusers', as in diffusers' own
# kohya converter (`_convert_unet_lora_key`) and kohya's `sdxl_model_util`.
_SGM_INNER = (
    ("in_layers_2", "conv1"),
    ("out_layers_3", "conv2"),
    ("emb_layers_1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
)
_SGM_BLOCKS = (
    ("lora_unet_input_blocks_", "lora_unet_down_blocks_"),
    ("lora_unet_middle_block_", "lora_unet_mid_block_"),
    ("lora_unet_output_blocks_", "lora_unet_up_blocks_"),
)
_SGM_OUTER = (
    ("lora_unet_input_blocks_0_0", "lora_unet_conv_in"),
    ("lora_unet_out_2", "lora_unet_conv_out"),
    ("lora_unet_time_embed_0", "lora_unet_time_embedding_linear_1"),
    ("lora_unet_time_embed_2", "lora_unet_time_embedding_linear_2"),
    ("lora_unet_label_emb_0_0", "lora_unet_add_embedding_linear_1"),
    ("lora_unet_label_emb_0_2", "lora_unet_add_embedding_linear_2"),
)


_SGM_STARTS = tuple(
    "lora_unet_" + p
    for p in ("input_blocks", "middle_block", "output_blocks", "out_", "time_embed_", "label_emb")
)


def _to_diffusers_unet_names(state_dict: dict[str, torch.Tensor], pipe: Any) -> dict:
    """kohya writes SDXL UNet keys with SGM block names (`lora_unet_input_blocks_4_1_…`):
    rename the blocks with diffusers' own converter, then the layers inside them."""
    if not any(k.startswith(_SGM_STARTS) for k in state_dict):
        return state_dict
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    renamed = {}
    for key, tensor in state_dict.items():
        for old, new in _SGM_OUTER:
            if key.startswith(old + "."):
                key = new + key[len(old) :]
        renamed[key] = tensor
    blocks = [
        k for k in renamed if re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", k)
    ]
    if blocks:
        try:
            mapped = _maybe_map_sgm_blocks_to_diffusers(
                {k: renamed.pop(k) for k in blocks}, of_pipe(pipe).denoiser(pipe).config
            )
        except (ValueError, IndexError, KeyError):
            mapped = {}
        renamed.update(mapped)
    out = {}
    for key, tensor in renamed.items():
        module, _, param = key.partition(".")
        if module.startswith("lora_unet_"):
            for old, new in _SGM_BLOCKS:
                module = module.replace(old, new)
            for old, new in _SGM_INNER:
                module = re.sub(rf"_(resnets_\d+)_{old}$", rf"_\1_{new}", module)
            module = re.sub(r"_downsamplers_0_op$", "_downsamplers_0_conv", module)
        out[f"{module}.{param}"] = tensor
    return out
