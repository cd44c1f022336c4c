"""Apply members' LoRAs to one job, then leave the pipeline exactly as it was.

Files come from kohya/A1111/Civitai (`lora_unet_…` keys, LoRA and LoCon), from
diffusers/peft (`lora_A`/`lora_B`), and from LyCORIS (LoHa `hada_*`, LoKr `lokr_*`).
Each file becomes a named peft adapter in the UNet and text encoders (kohya and diffusers
files through diffusers' own loader, LoHa/LoKr as peft `LoHaConfig`/`LoKrConfig`
adapters), and stays loaded, LRU-evicted by bytes, so a popular LoRA costs nothing the
second time.

Between jobs every adapter is disabled, so peft's layers return their base layer's
output unchanged: a job without LoRAs draws exactly the image it drew before any LoRA
was loaded. `activate` turns a job's adapters on at its weights with peft's own
machinery. `activate_per_sample` runs one batch where every sample has its own LoRAs:
a forward hook on each adapted layer adds each sample's adapter outputs, at that
sample's weights, to that sample's rows only. That composes any number of LoRAs and
weights per sample without building a merged adapter per combination.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.contract.jobs import JobError, LoraRef
from pipeline.prompts.encoding import extract_loras

log = logging.getLogger(__name__)

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# Cross-attention width of each family's UNet (the text embedding width it reads).
_CROSS_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


class LoraError(JobError):
    """A LoRA that cannot be used. The message names it and is shown to the member."""


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read and checked, ready to load into a pipeline."""

    name: str
    path: Path
    sha256: str
    format: str  # "diffusers" | "kohya" | "loha" | "lokr"
    family: str | None  # what the keys say it was made for; None when they don't tell
    state_dict: dict[str, torch.Tensor]
    nbytes: int


def read_lora_file(path: str | Path, *, name: str, family: str, max_bytes: int) -> LoraFile:
    """Read a .safetensors LoRA, detect its format and family; raise LoraError if unusable."""
    from safetensors.torch import load

    path = Path(path)
    nbytes = path.stat().st_size
    if nbytes > max_bytes:
        raise LoraError(
            f"LoRA '{name}' is {nbytes / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.1f} MB"
        )
    data = path.read_bytes()
    try:
        state_dict = load(data)
    except Exception:  # safetensors raises its own error types for any bad header
        raise LoraError(f"'{name}' is not a LoRA file (not a readable .safetensors)") from None
    fmt = detect_format(state_dict)
    if fmt is None:
        raise LoraError(f"'{name}' is not a LoRA file (it has no LoRA weights)")
    made_for = detect_family(state_dict)
    if made_for is not None and made_for != family:
        raise LoraError(
            f"LoRA '{name}' was made for {FAMILY_NAMES[made_for]}; "
            f"this model is {FAMILY_NAMES.get(family, family)}"
        )
    sha = hashlib.sha256(data).hexdigest()
    return LoraFile(name, path, sha, fmt, made_for, state_dict, nbytes)


def detect_format(state_dict: dict[str, torch.Tensor]) -> str | None:
    keys = list(state_dict)
    if any(".hada_w1_a" in k for k in keys):
        return "loha"
    if any(".lokr_w1" in k for k in keys):
        return "lokr"
    if any(k.startswith(_KOHYA_PREFIXES) and ".lora_down." in k for k in keys):
        return "kohya"
    diffusers_marks = (".lora_A.", ".lora.down.", ".lora_linear_layer.down.")
    if any(mark in k for k in keys for mark in diffusers_marks):
        return "diffusers"
    return None


def detect_family(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The base model family a LoRA was trained on, from key names and layer widths."""
    keys = list(state_dict)
    if any(k.startswith(("lora_te2_", "text_encoder_2.", "te2.")) for k in keys):
        return "sdxl"
    for key in keys:
        dim = _cross_attention_in_dim(key, state_dict[key])
        if dim in _CROSS_DIMS:
            return _CROSS_DIMS[dim]
    if any(k.startswith("lora_te_") for k in keys):
        # kohya names SDXL's encoders te1/te2; a lone te is SD 1.x (768) or SD 2.x (1024)
        q_proj = "q_proj.lora_down.weight"
        widths = {v.shape[-1] for k, v in state_dict.items() if k.endswith(q_proj)}
        return "sd2" if 1024 in widths else "sd1"
    return None


def _cross_attention_in_dim(key: str, tensor: torch.Tensor) -> int | None:
    """Input width of a cross-attention key projection: the text embedding width."""
    flat = key.replace(".", "_")
    if "attn2_to_k" not in flat:
        return None
    for down in ("lora_down_weight", "lora_A_weight", "lora_down.weight", "hada_w1_b"):
        if flat.endswith(down.replace(".", "_")):
            return int(tensor.shape[1])
    return None


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
        path = files.get(name.lower())
        if path is None:
            closest = difflib.get_close_matches(name.lower(), sorted(files), n=3, cutoff=0.4)
            hint = f"; closest: {', '.join(files[c].stem for c in closest)}" if closest else ""
            raise LoraError(f"LoRA '{name}' not found{hint}")
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        resolved.append((LoraRef(name, sha, weight), path))
    return resolved


def pipe_family(pipe: Any) -> str:
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd1"


def adapter_name(sha256: str) -> str:
    return f"lora_{sha256[:16]}"


class LoraCache:
    """LoRA adapters kept loaded in one pipeline, least recently used evicted by bytes."""

    def __init__(self, pipe: Any, *, max_bytes: int, max_file_bytes: int | None = None) -> None:
        self.pipe = pipe
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes or max_bytes
        self._loaded: OrderedDict[str, int] = OrderedDict()  # adapter name → bytes
        self.hits = 0
        self.misses = 0

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "bytes": sum(self._loaded.values()),
            "loaded": len(self._loaded),
        }

    def loaded(self) -> list[str]:
        """Adapter names, least recently used first."""
        return list(self._loaded)

    @contextmanager
    def activate(self, loras: Sequence[tuple[LoraRef, Path]]) -> Iterator[None]:
        """Run the pipeline (prompt encoding included) with these LoRAs at their weights."""
        weights = self._prepare([loras])[0]
        if not weights:
            yield
            return
        layers = list(self._tuner_layers())
        names = list(weights)
        try:
            for layer in layers:
                layer.enable_adapters(True)
                layer.set_adapter(names, inference_mode=True)
                for name, weight in weights.items():
                    layer.set_scale(name, weight)
            yield
        finally:
            for layer in layers:
                for name in names:
                    layer.set_scale(name, 1.0)
                layer.enable_adapters(False)

    @contextmanager
    def activate_per_sample(
        self, per_sample: Sequence[Sequence[tuple[LoraRef, Path]]], *, cfg: bool
    ) -> Iterator[None]:
        """One pipeline call where sample i runs with its own LoRAs and weights.

        Inside, the UNet must see the batch as diffusers builds it (samples in order, and
        with `cfg` the negative half then the positive half), and prompts must be encoded
        together with `pipeline.prompts.encoding.encode_prompts`, which feeds the text encoders
        sample by sample with equal rows per sample.
        """
        plan = _RowPlan(self._prepare(per_sample), cfg=cfg)
        handles = []
        try:
            for model_name, model in self._models():
                layout = "tile" if model_name == "unet" else "interleave"
                hook = _mixed_batch_hook(plan, layout)
                for layer in _tuner_layers(model):
                    handles.append(layer.register_forward_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _prepare(
        self, per_sample: Sequence[Sequence[tuple[LoraRef, Path]]]
    ) -> list[dict[str, float]]:
        """Load every adapter the samples need; return each sample's {adapter: weight}."""
        needed = {adapter_name(ref.sha256) for sample in per_sample for ref, _ in sample}
        weights = []
        for sample in per_sample:
            sample_weights: dict[str, float] = {}
            for ref, path in sample:
                name = self._ensure(ref, path, keep=needed)
                sample_weights[name] = sample_weights.get(name, 0.0) + ref.weight
            weights.append(sample_weights)
        return weights

    def _ensure(self, ref: LoraRef, path: Path, *, keep: set[str]) -> str:
        name = adapter_name(ref.sha256)
        if name in self._loaded:
            self._loaded.move_to_end(name)
            self.hits += 1
            return name
        self.misses += 1
        lora = read_lora_file(
            path, name=ref.name, family=pipe_family(self.pipe), max_bytes=self.max_file_bytes
        )
        self._evict_for(lora.nbytes, keep)  # the file's size: an estimate until loaded
        self._load(lora, name)
        # What counts is what the adapter occupies on the device, in the model's dtype
        # (an fp16 file in an fp32 model takes twice its size), not the file.
        nbytes = self._device_bytes(name)
        self._evict_for(nbytes, keep | {name})
        self._loaded[name] = nbytes
        return name

    def _device_bytes(self, name: str) -> int:
        """Bytes of the adapter's tensors in the models (parameters named …<name>…)."""
        total = 0
        for _, model in self._models():
            for path, tensor in [*model.named_parameters(), *model.named_buffers()]:
                if f".{name}." in path or path.endswith(f".{name}"):
                    total += tensor.numel() * tensor.element_size()
        return total

    def _evict_for(self, nbytes: int, keep: set[str]) -> None:
        for name in list(self._loaded):
            if sum(self._loaded.values()) + nbytes <= self.max_bytes:
                return
            if name not in keep:
                self._delete(name)
                del self._loaded[name]

    def _load(self, lora: LoraFile, name: str) -> None:
        try:
            with _quiet_loading():
                self._load_adapter(lora, name)
            if not any(_has_adapter(layer, name) for layer in self._tuner_layers()):
                raise LoraError(f"LoRA '{lora.name}' matches no layer of this model")
            _check_plain_lora(lora.name, name, self._tuner_layers())
        except Exception as exc:
            self._delete(name)
            if isinstance(exc, LoraError):
                raise
            log.warning("LoRA %s (%s) failed to load: %r", lora.name, lora.path, exc)
            family = FAMILY_NAMES[pipe_family(self.pipe)]
            raise LoraError(
                f"LoRA '{lora.name}' does not fit this {family} model "
                "(it was made for a different base model, or the file is damaged)"
            ) from None
        finally:
            for layer in self._tuner_layers():
                layer.enable_adapters(False)  # loaded adapters stay off until a job asks

    def _load_adapter(self, lora: LoraFile, name: str) -> None:
        if lora.format in ("loha", "lokr"):
            _load_lycoris(self.pipe, lora, name, list(self._models()))
        else:  # diffusers converts kohya keys (and SDXL's SGM block names) itself
            self.pipe.load_lora_weights(dict(lora.state_dict), adapter_name=name)

    def _delete(self, name: str) -> None:
        for _, model in self._models():
            for layer in _tuner_layers(model):
                if _has_adapter(layer, name):
                    layer.delete_adapter(name)
            config = getattr(model, "peft_config", None)
            if isinstance(config, dict):
                config.pop(name, None)

    def _models(self) -> Iterator[tuple[str, nn.Module]]:
        for attr in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(self.pipe, attr, None)
            if model is not None:
                yield attr, model

    def _tuner_layers(self) -> Iterator[Any]:
        for _, model in self._models():
            yield from _tuner_layers(model)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Loading an adapter makes transformers print a load report listing every other
    adapter's weights as "missing", and peft warn; neither says anything useful here."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = transformers_logging.get_verbosity(), diffusers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers_logging.set_verbosity(levels[0])
        diffusers_logging.set_verbosity(levels[1])


def _tuner_layers(model: nn.Module) -> Iterator[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            yield module


def _has_adapter(layer: Any, name: str) -> bool:
    return name in getattr(layer, "scaling", {})


def _check_plain_lora(lora_name: str, name: str, layers: Iterator[Any]) -> None:
    """Weight scaling and per-sample batches assume plain LoRA math: no DoRA etc."""
    for layer in layers:
        if name in getattr(layer, "lora_variant", {}):
            raise LoraError(f"LoRA '{lora_name}' uses DoRA, which is not supported")


# --- LyCORIS (LoHa, LoKr) --------------------------------------------------------------

_LYCORIS_PARAMS = (
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "alpha",
)  # fmt: skip


def _load_lycoris(pipe: Any, lora: LoraFile, name: str, models: list[tuple[str, nn.Module]]):
    """Build peft LoHa/LoKr adapters from LyCORIS's kohya-named keys and load the weights."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    state_dict = dict(lora.state_dict)
    if pipe_family(pipe) == "sdxl":  # kohya writes SDXL UNet keys with SGM block names
        state_dict = _maybe_map_sgm_blocks_to_diffusers(state_dict, pipe.unet.config)
    modules = _group_by_module(state_dict)
    prefixes = _kohya_prefixes(pipe)
    matched = 0
    for model_name, model in models:
        lookup = _kohya_lookup(model, prefixes[model_name])
        targets = {lookup[k]: params for k, params in modules.items() if k in lookup}
        if targets:
            _inject_lycoris(model, lora, name, targets)
            matched += len(targets)
    if matched < len(modules):
        log.warning(
            "LoRA %s: %d of %d layers match no module",
            lora.name,
            len(modules) - matched,
            len(modules),
        )


def _group_by_module(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        if param in _LYCORIS_PARAMS:
            modules.setdefault(module, {})[param] = tensor
    return {m: p for m, p in modules.items() if set(p) - {"alpha"}}


def _kohya_prefixes(pipe: Any) -> dict[str, str]:
    if pipe_family(pipe) == "sdxl":
        return {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    return {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def _kohya_lookup(model: nn.Module, prefix: str) -> dict[str, str]:
    """kohya module name (dots → underscores) → module path, for adaptable layers."""
    lookup = {}
    for path, module in model.named_modules():
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if isinstance(base, nn.Linear | nn.Conv2d) and not _inside_tuner(path):
            lookup[prefix + path.replace(".", "_")] = path
    return lookup


def _inside_tuner(path: str) -> bool:
    # A peft wrapper keeps the original layer as `base_layer` and adds its own; the
    # wrapper's own path is what a new adapter targets.
    parts = path.split(".")
    return "base_layer" in parts or any(p.startswith(("lora_", "hada_", "lokr_")) for p in parts)


def _inject_lycoris(
    model: nn.Module, lora: LoraFile, name: str, targets: dict[str, dict[str, torch.Tensor]]
) -> None:
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    config = _loha_config(targets) if lora.format == "loha" else _lokr_config(lora.name, targets)
    inject_adapter_in_model(config, model, adapter_name=name)
    weights = {
        f"{path}.{param}": tensor
        for path, params in targets.items()
        for param, tensor in params.items()
        if param != "alpha"
    }
    result = set_peft_model_state_dict(model, weights, adapter_name=name)
    ours = [k for k in result.missing_keys if f".{name}" in k]
    if ours or result.unexpected_keys:
        raise ValueError(f"LyCORIS keys left unloaded: {(ours + result.unexpected_keys)[:3]}")


def _target_regex(paths: Sequence[str]) -> str:
    return "|".join(re.escape(p) for p in paths)


def _loha_config(targets: dict[str, dict[str, torch.Tensor]]) -> Any:
    from peft import LoHaConfig

    ranks = {path: int(p["hada_w1_b"].shape[0]) for path, p in targets.items()}
    alphas = {path: _alpha(p, ranks[path]) for path, p in targets.items()}
    return LoHaConfig(
        r=next(iter(ranks.values())),
        alpha=next(iter(alphas.values())),
        target_modules=_target_regex(list(targets)),
        rank_pattern={re.escape(k): v for k, v in ranks.items()},
        alpha_pattern={re.escape(k): v for k, v in alphas.items()},
        use_effective_conv2d=any("hada_t1" in p for p in targets.values()),
        init_weights=True,
    )


def _alpha(params: dict[str, torch.Tensor], rank: int) -> float:
    # LyCORIS: scale = alpha / rank; a file without alpha means scale 1.
    return float(params["alpha"]) if "alpha" in params else float(rank)


def _lokr_config(lora_name: str, targets: dict[str, dict[str, torch.Tensor]]) -> Any:
    """peft derives LoKr factor shapes from (decompose_factor, r): choose both so they
    reproduce the file's shapes, layer by layer (r and alpha per layer)."""
    from peft import LoKrConfig

    factor = _lokr_factor(lora_name, targets)
    ranks, alphas = {}, {}
    for path, p in targets.items():
        ranks[path], alphas[path] = _lokr_rank_alpha(p)
    return LoKrConfig(
        r=next(iter(ranks.values())),
        alpha=next(iter(alphas.values())),
        target_modules=_target_regex(list(targets)),
        rank_pattern={re.escape(k): v for k, v in ranks.items()},
        alpha_pattern={re.escape(k): v for k, v in alphas.items()},
        decompose_both=any("lokr_w1_a" in p for p in targets.values()),
        decompose_factor=factor,
        use_effective_conv2d=any("lokr_t2" in p for p in targets.values()),
        init_weights=True,
    )


def _lokr_w1_shape(p: dict[str, torch.Tensor]) -> tuple[int, int]:
    if "lokr_w1" in p:
        return int(p["lokr_w1"].shape[0]), int(p["lokr_w1"].shape[1])
    return int(p["lokr_w1_a"].shape[0]), int(p["lokr_w1_b"].shape[1])


def _lokr_w2_shape(p: dict[str, torch.Tensor]) -> tuple[int, int]:
    if "lokr_w2" in p:
        return int(p["lokr_w2"].shape[0]), int(p["lokr_w2"].shape[1])
    if "lokr_t2" in p:
        return int(p["lokr_w2_a"].shape[1]), int(p["lokr_w2_b"].shape[1])
    return int(p["lokr_w2_a"].shape[0]), -1  # in-width is flattened with the kernel


def _lokr_factor(lora_name: str, targets: dict[str, dict[str, torch.Tensor]]) -> int:
    from peft.tuners.lokr.layer import factorization

    shapes = [_lokr_w1_shape(p) + _lokr_w2_shape(p) for p in targets.values()]
    candidates = [-1] + sorted({s[0] for s in shapes})
    for factor in candidates:
        if all(_factor_fits(factorization, factor, s) for s in shapes):
            return factor
    raise LoraError(f"LoRA '{lora_name}' uses a LoKr layout this bot cannot load")


def _factor_fits(factorization: Callable[..., tuple[int, int]], factor: int, shape: tuple) -> bool:
    out_l, in_m, out_k, in_n = shape
    out_dim = out_l * out_k
    if factorization(out_dim, factor) != (out_l, out_k):
        return False
    return in_n == -1 or factorization(in_m * in_n, factor) == (in_m, in_n)


def _lokr_rank_alpha(p: dict[str, torch.Tensor]) -> tuple[int, float]:
    if "lokr_t2" in p:
        rank = int(p["lokr_t2"].shape[0])
    elif "lokr_w2_a" in p:
        rank = int(p["lokr_w2_a"].shape[1])
    elif "lokr_w1_a" in p:
        rank = int(p["lokr_w1_a"].shape[1])
    else:  # both factors full: peft keeps w2 whole when r ≥ half its larger side
        out_k, in_n = _lokr_w2_shape(p)
        rank = max(out_k, in_n)
    full = "lokr_w1" in p and "lokr_w2" in p
    # LyCORIS uses scale 1 when neither factor is decomposed, whatever alpha says.
    return rank, float(rank) if full else _alpha(p, rank)


# --- mixed-LoRA batches ------------------------------------------------------------------


class _RowPlan:
    """Which adapter rows of a batch get, at which weight, for a given batch layout."""

    def __init__(self, per_sample: list[dict[str, float]], *, cfg: bool) -> None:
        self.per_sample = per_sample
        self.cfg = cfg
        self.adapters = list(dict.fromkeys(a for sample in per_sample for a in sample))
        self._cache: dict[tuple[str, int, str], list[tuple[str, torch.Tensor, list[float]]]] = {}

    def groups(
        self, layout: str, rows: int, device: torch.device
    ) -> list[tuple[str, torch.Tensor, list[float]]]:
        key = (layout, rows, str(device))
        if key not in self._cache:
            self._cache[key] = self._build(self._row_samples(layout, rows), device)
        return self._cache[key]

    def _row_samples(self, layout: str, rows: int) -> list[int]:
        n = len(self.per_sample)
        if layout == "tile":  # UNet: [samples] or, with CFG, [negatives…, positives…]
            expected = n * (2 if self.cfg else 1)
            if rows != expected:
                raise RuntimeError(f"mixed-LoRA batch of {n} samples got {rows} UNet rows")
            return list(range(n)) * (rows // n)
        if rows % n:  # text encoders: each sample's chunk rows together
            raise RuntimeError(f"mixed-LoRA batch of {n} samples got {rows} text-encoder rows")
        return [i for i in range(n) for _ in range(rows // n)]

    def _build(self, samples: list[int], device: torch.device):
        groups = []
        for adapter in self.adapters:
            rows = [r for r, s in enumerate(samples) if adapter in self.per_sample[s]]
            weights = [self.per_sample[samples[r]][adapter] for r in rows]
            groups.append((adapter, torch.tensor(rows, device=device), weights))
        return groups


def _mixed_batch_hook(plan: _RowPlan, layout: str) -> Callable[..., torch.Tensor]:
    """Forward hook for a peft layer whose adapters are disabled (output = base layer):
    adds each row's own adapters' outputs at that row's weights."""

    def hook(layer: Any, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        rows = output.shape[0]
        for adapter, index, weights in plan.groups(layout, rows, output.device):
            if not _has_adapter(layer, adapter):
                continue
            whole = len(weights) == rows
            delta = _adapter_delta(layer, adapter, x if whole else x.index_select(0, index))
            scale = torch.tensor(weights, dtype=delta.dtype, device=delta.device)
            delta = delta * scale.view(-1, *[1] * (delta.ndim - 1))
            output = (
                output + delta.to(output.dtype)
                if whole
                else output.index_add(0, index, delta.to(output.dtype))
            )
        return output

    return hook


def _adapter_delta(layer: Any, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """One adapter's contribution at weight 1 (what peft adds to the base output)."""
    from peft.tuners.lora import LoraLayer

    if isinstance(layer, LoraLayer):
        lora_a = layer.lora_A[adapter]
        x = layer._cast_input_dtype(x, lora_a.weight.dtype)
        lora_b, dropout = layer.lora_B[adapter], layer.lora_dropout[adapter]
        return lora_b(lora_a(dropout(x))) * layer.scaling[adapter]
    return layer._get_delta_activations(adapter, x)
