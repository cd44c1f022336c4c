"""Load base models once per worker: Hub ids, diffusers folders, single-file checkpoints.

A model is loaded once and kept; img2img and inpaint pipelines are derived from it
with `from_pipe`, which shares the same modules (no second copy of the weights).
CUDA gets fp16 (or bf16 when configured), the CPU fp32; attention is PyTorch's SDPA
(diffusers' default processor on torch ≥ 2). The loading code is the same for the
tests' tiny model folder and for a real checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.contract.config import Config, ModelConfig
from pipeline.contract.families import (
    SINGLE_FILE_SUFFIXES,
    ModelError,
    detect_family,
    family_from_checkpoint,
    hub_error,
)
from pipeline.families import Family
from pipeline.families import family as family_of

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    family: str  # the config name of its family (pipeline/families/)
    source: str
    hash: str  # A1111 "Model hash": first 10 hex of the weights' sha256
    device: str
    dtype: Any
    pipe: Any  # the text-to-image pipeline; its modules are shared by the derived ones
    config: ModelConfig
    scheduler_config: dict[str, Any] = field(default_factory=dict)  # samplers build on it
    variant: Family | None = None  # the family as this model is (Flux.1 schnell, Kontext…)
    plan: Any = None  # the MemoryPlan it was loaded with (None: sizes unknown, loaded as is)
    _derived: dict[str, Any] = field(default_factory=dict)
    _inpaint_model: LoadedModel | None = None

    @property
    def kind(self) -> Family:
        """Its family (as this model's variant is): the one place that knows its
        pipelines and components."""
        return self.variant or family_of(self.family)

    def kind_of(self, pipe: Any) -> Family:
        """The family (variant) of one of this model's pipelines: the dedicated
        inpainting model's own (Flux.1 Fill beside a dev) or this model's."""
        inpaint = self._inpaint_model
        if inpaint is not None and pipe is inpaint.pipe:
            return inpaint.kind
        return self.kind

    def img2img(self):
        return self._derive("img2img")

    def inpaint(self):
        """The inpaint pipeline: the dedicated inpainting model when configured,
        else derived from the base model (diffusers blends latents for 4-channel UNets)."""
        if self._inpaint_model is not None:
            return self._inpaint_model.pipe
        return self._derive("inpaint")

    def derive(self, kind: str):
        """The family's pipeline for a mode (edit: the loaded one, for the edit models)."""
        return self._derive(kind)

    def _derive(self, kind: str):
        if kind not in self._derived:
            # from_pipe casts every (shared) module to float32 unless told the dtype:
            # without it the first img2img job would turn an fp16 model into fp32.
            cls = self.kind.pipeline_class(kind)
            if cls is type(self.pipe):
                return self.pipe
            derived = cls.from_pipe(self.pipe, torch_dtype=self.dtype)
            derived.set_progress_bar_config(disable=True)
            self._derived[kind] = derived
        return self._derived[kind]


def choose_device(requested: str = "auto") -> str:
    import torch

    if requested not in ("auto", ""):
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_capability(device: str) -> tuple[int, int] | None:
    """The CUDA compute capability of this very device (cuda:N, not the current one)."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(torch.device(device)))  # type: ignore[return-value]


def choose_dtype(device: str, requested: str = "auto"):
    """The torch dtype for a worker on `device`: see `pipeline.contract.devices.dtype_for`."""
    import torch

    from pipeline.contract.devices import dtype_for

    kind = device.partition(":")[0]
    return getattr(torch, dtype_for(kind, device_capability(device), requested))


def prepare_device(device: str) -> str:
    """Check that this process can use `device` and make it the current CUDA device (so
    that every allocation and query without an index lands on the worker's own GPU).
    Raises DeviceError naming the device and what this machine has."""
    import torch

    from pipeline.contract.devices import DeviceError, check_devices

    device = choose_device(device)
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        how = f"torch {torch.__version__} sees {count}"
        if torch.version.cuda is None:
            how = f"torch {torch.__version__} is built without CUDA"
        check_devices([device], count, how=how)
        torch.cuda.set_device(torch.device(device))
    elif device == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("workers.devices: mps is not available on this machine; use cpu")
    return device


def weights_hash(source: str, denoiser: str = "unet") -> str:
    """A1111's short model hash: sha256 of the checkpoint file, first 10 hex.

    For a diffusers folder we hash the denoiser's (UNet's, transformer's) first weights
    file — the part that identifies the model; Hub ids are resolved to their cached
    files by diffusers first.
    """
    path = Path(source)
    if path.is_dir():
        candidates = sorted((path / denoiser).glob("*.safetensors")) + sorted(
            (path / denoiser).glob("*.bin")
        )
        if not candidates:
            return hashlib.sha256(source.encode()).hexdigest()[:10]
        path = candidates[0]
    elif not path.exists():
        return hashlib.sha256(source.encode()).hexdigest()[:10]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def load_model(
    model: ModelConfig,
    *,
    device: str = "auto",
    dtype: str = "auto",
    plan: Any = None,
    variants: Mapping[str, str] | None = None,
) -> LoadedModel:
    """Load one configured model onto a device (held as `plan` says, a MemoryPlan, when
    given: pipeline.models.memory; `variants`: the weights variant of each downloaded
    folder by its key, source, inpaint_source or single_file_config:
    pipeline.models.download). Raises ModelError with a clear message."""
    variants = variants or {}
    device = choose_device(device)
    torch_dtype = choose_dtype(device, dtype)
    family = model.family if model.family != "auto" else detect_family(model.source)
    kind = family_of(family).for_source(model.source)
    try:
        pipe = _load_pipeline(
            model.source,
            kind,
            torch_dtype,
            config=model.single_file_config,
            variant=variants.get("source", ""),
            config_variant=variants.get("single_file_config", ""),
        )
        if plan is None:
            pipe.to(device)
        else:
            from pipeline.models.memory import apply_plan

            apply_plan(pipe, plan, device)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
        if not is_out_of_memory(exc):
            raise
        pipe = None
        raise _loading_oom(model, device, exc) from None
    pipe.set_progress_bar_config(disable=True)
    loaded = LoadedModel(
        name=model.name,
        family=family,
        source=model.source,
        hash=weights_hash(_local_source(model.source, pipe), kind.denoiser_name),
        device=device,
        dtype=torch_dtype,
        pipe=pipe,
        config=model,
        scheduler_config=dict(pipe.scheduler.config),
        variant=kind,
    )
    if model.inpaint_source:
        try:
            inpaint_kind = family_of(family).for_source(model.inpaint_source)
            inpaint = _load_pipeline(
                model.inpaint_source,
                inpaint_kind,
                torch_dtype,
                inpaint=True,
                variant=variants.get("inpaint_source", ""),
            )
            inpaint.to(device)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
            if not is_out_of_memory(exc):
                raise
            pipe = loaded = inpaint = None
            raise _loading_oom(model, device, exc) from None
        inpaint.set_progress_bar_config(disable=True)
        loaded._inpaint_model = LoadedModel(
            name=f"{model.name}-inpaint",
            family=family,
            source=model.inpaint_source,
            hash=weights_hash(model.inpaint_source, inpaint_kind.denoiser_name),
            device=device,
            dtype=torch_dtype,
            pipe=inpaint,
            config=model,
            variant=inpaint_kind,
        )
    log.info("loaded model %s (%s) on %s as %s", model.name, family, device, torch_dtype)
    return loaded


def _local_source(source: str, pipe: Any) -> str:
    if Path(source).exists():
        return source
    return str(getattr(pipe, "_name_or_path", None) or pipe.config.get("_name_or_path", source))


def _load_pipeline(
    source: str,
    kind: Family,
    torch_dtype: Any,
    *,
    inpaint: bool = False,
    config: str = "",
    variant: str = "",
    config_variant: str = "",
):
    family = kind.name
    cls = kind.pipeline_class("inpaint" if inpaint else "txt2img")
    path = Path(source)
    options = kind.load_options()
    try:
        if path.suffix in SINGLE_FILE_SUFFIXES:
            return _from_single_file(kind, cls, path, torch_dtype, config, config_variant)
        if source.startswith(("/", "./", "../")) and not path.is_dir():
            raise ModelError(f"model folder {source} does not exist")
        if variant:  # only files of that variant were downloaded
            options = {**options, "variant": variant}
        return cls.from_pretrained(
            source, torch_dtype=torch_dtype, **options, **kind.extra_components(source)
        )
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - out of memory is the caller's to word
        if is_out_of_memory(exc):
            raise
        if isinstance(exc, OSError):
            if path.exists():
                raise ModelError(f"model {source} could not be loaded: {_short(exc)}") from None
            raise hub_error(source, exc) from None
        raise ModelError(
            f"model {source} could not be loaded as a {family} "
            f"{'inpainting ' if inpaint else ''}pipeline: {_short(exc)}"
        ) from None


def _from_single_file(
    kind: Family, cls, path: Path, torch_dtype: Any, config: str, variant: str = ""
):
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    family_from_checkpoint(path)  # a clear error for a file that is no checkpoint
    try:
        return kind.load_single_file(cls, path, torch_dtype, config, variant)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds here
        if not config and ("connect" in str(exc).lower() or os.environ.get("HF_HUB_OFFLINE")):
            raise ModelError(
                f"model file {path}: a single-file checkpoint needs its model's configuration, "
                "which diffusers downloads from the Hub, and the Hub cannot be reached. Set "
                "single_file_config to a local diffusers folder of the same family."
            ) from None
        raise


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


class ModelCache:
    """The models of one worker, each loaded on first use and kept, at most
    `workers.max_models` of them: loading one more unloads the least recently used."""

    def __init__(
        self,
        config: Config,
        device: str = "auto",
        *,
        on_evict: Callable[[str], None] | None = None,
    ):
        self.config = config
        self.device = device
        self.on_evict = on_evict  # told the name of each model unloaded (drop its LoRAs)
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()  # least recent first
        self._fetched: dict[str, Any] = {}  # model name → its download (download.Fetched)

    def get(
        self, name: str = "default", on_download: Any = None, should_stop: Any = None
    ) -> LoadedModel:
        """The model, loaded first if it is not (downloaded first if it loads from a Hub id
        whose files are not all in the cache: `on_download` is told the progress, and the
        download stops with DownloadStopped once `should_stop()` is true)."""
        model_config = self.config.model(name)
        key = model_config.name
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        self._make_room(self.config.workers.max_models - 1)
        from pipeline.models.memory import planned

        model_config, variants = self._downloaded(model_config, on_download, should_stop)
        model_config, plan = planned(self.config, model_config, self.device)
        dtype = self.config.workers.dtype
        try:
            loaded = load_model(
                model_config, device=self.device, dtype=dtype, plan=plan, variants=variants
            )
        except ModelError as exc:
            if not getattr(exc, "out_of_memory", False) or not self._models:
                raise
            # Out of memory with other models loaded: unload them all and try once more.
            self._make_room(0)
            loaded = load_model(
                model_config, device=self.device, dtype=dtype, plan=plan, variants=variants
            )
        loaded.plan = plan
        self._models[key] = loaded
        return loaded

    def _downloaded(
        self, model: ModelConfig, on_download: Any, should_stop: Any
    ) -> tuple[ModelConfig, dict[str, str]]:
        """The model with each Hub id it loads from (its source, inpaint_source, a single
        file's single_file_config) as its downloaded snapshot folder, and the weights
        variant of each; a model from local files unchanged. Offline, the model loads
        from the cache as before."""
        from pipeline.models.download import (
            HubUnreachable,
            fetch_model,
            hub_parts,
            log_progress,
        )

        if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_parts(model):
            return model, {}
        if model.name not in self._fetched:
            half = choose_dtype(choose_device(self.device), self.config.workers.dtype)
            try:
                self._fetched[model.name] = fetch_model(
                    model,
                    half=str(half) != "torch.float32",
                    on_progress=log_progress(model.name, on_download),
                    should_stop=should_stop,
                )
            except HubUnreachable as exc:
                log.warning("%s; loading %s from the cache", exc, model.name)
                return model, {}
        fetched = self._fetched[model.name]
        return fetched.model, dict(fetched.variants)

    def loaded(self) -> list[LoadedModel]:
        """The loaded models, least recently used first."""
        return list(self._models.values())

    def _make_room(self, keep: int) -> None:
        while len(self._models) > max(keep, 0):
            name, _ = self._models.popitem(last=False)
            log.info(
                "unloading model %s (workers.max_models = %d)", name, self.config.workers.max_models
            )
            if self.on_evict is not None:
                self.on_evict(name)
            free_device_memory(self.device)


def free_device_memory(device: str) -> None:
    """Collect garbage (cycles keep tensors alive) and give cached CUDA blocks back."""
    import gc

    gc.collect()
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """True when the exception, or one it was raised from (diffusers wraps a safetensors
    MemoryError in an OSError), is running out of memory."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, MemoryError) or type(current).__name__ == "OutOfMemoryError":
            return True  # torch.cuda.OutOfMemoryError is a RuntimeError subclass by that name
        text = str(current).lower()
        # MPS and the CPU allocator word it differently from CUDA.
        if isinstance(current, RuntimeError) and (
            "out of memory" in text or "can't allocate memory" in text
        ):
            return True
        current, seen = current.__cause__ or current.__context__, seen + 1
    return False


def _loading_oom(model: ModelConfig, device: str, exc: BaseException) -> ModelError:
    """The ModelError for running out of memory while loading (not "try a smaller size":
    no image was being made)."""
    import traceback

    traceback.clear_frames(exc.__traceback__)
    free_device_memory(device)
    where, detail = "worker", ""
    if device.startswith("cuda"):
        import torch

        where = "GPU"
        free, total = torch.cuda.mem_get_info(torch.device(device))
        detail = f" ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free on {device})"
    error = ModelError(
        f"the {where} ran out of memory while loading model {model.name!r}{detail}; lower "
        "workers.max_models, use float16, or a smaller model"
    )
    error.out_of_memory = True  # type: ignore[attr-defined]
    return error
