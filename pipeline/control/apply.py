"""The hook generation modes call: a job's ControlNet units and IP-Adapter reference
turned into the pipeline to call and the extra call arguments.

    with applied(run.control, model, pipe, "img2img", samples, blobs, w, h, source=image) \\
            as (pipe, extra):
        ... pipe(..., **extra)

Without units or a reference it yields the pipeline unchanged and no arguments, so
jobs that use neither run exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from PIL import Image

from pipeline.contract.control import (
    ControlUnit,
    canonical_preprocessor,
    thresholds,
    unit_infotext,
)
from pipeline.contract.images import open_image
from pipeline.contract.jobs import GenerateSpec, JobError
from pipeline.control.ip_adapter import IPAdapters, weights_file
from pipeline.control.preprocessors import fit, run_preprocessor
from pipeline.control.units import ControlNetCache, control_pipeline, file_hash, stack_units

MAX_CONTROL_PIXELS = 4096 * 4096


class ControlCache:
    """One worker's ControlNets (LRU by size) and the IP-Adapters of each model."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self._nets: ControlNetCache | None = None
        self._adapters: dict[int, IPAdapters] = {}
        self._ip_hashes: dict[str, str] = {}
        self._priors: dict[str, Any] = {}  # reference pipelines (Flux.1's Redux) by name

    def nets(self, model: Any) -> ControlNetCache:
        if self._nets is None:
            self._nets = ControlNetCache(self.config, model.device, model.dtype)
        return self._nets

    def ip_adapters(self, model: Any, pipe: Any) -> IPAdapters:
        key = id(model.kind.denoiser(pipe))
        if key not in self._adapters:
            self._adapters[key] = IPAdapters(self.config, model, pipe)
        return self._adapters[key]

    def ip_label(self, name: str) -> str:
        if name not in self._ip_hashes:
            entry = self.config.ip_adapters[name]
            try:
                self._ip_hashes[name] = file_hash(str(weights_file(entry.source)))
            except JobError:  # a diffusers folder (Redux): its own hash rule
                self._ip_hashes[name] = file_hash(entry.source)
        return f"{name} [{self._ip_hashes[name]}]"

    def reference_tokens(self, model: Any, name: str, images: list[Image.Image]) -> Any:
        """A reference family's image tokens for the prompt (Flux.1: Redux's SigLIP
        encoder and projector into T5's width), averaged over the images: [1, n, width]."""
        import diffusers
        import torch

        entry = self.config.ip_adapters[name]
        if name not in self._priors:
            cls = getattr(diffusers, model.kind.reference_pipeline)
            try:
                prior = cls.from_pretrained(entry.source, torch_dtype=model.dtype)
            except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds
                raise JobError(
                    f"reference model '{name}' could not be loaded from {entry.source} "
                    f"({type(exc).__name__}); {model.kind.label} takes a "
                    f"{model.kind.reference_pipeline} folder or Hub id"
                ) from None
            self._priors[name] = prior.to(model.device)
        prior = self._priors[name]
        with torch.inference_mode():
            encoded = prior.encode_image(images, prior._execution_device, 1)
            tokens = prior.image_embedder(encoded).image_embeds
        return tokens.mean(dim=0, keepdim=True)


def uses_control(specs: Sequence[GenerateSpec]) -> bool:
    return any(s.control or s.reference is not None for s in specs)


@contextmanager
def applied(
    cache: ControlCache | None,
    model: Any,
    pipe: Any,
    kind: str,
    samples: Sequence[GenerateSpec],
    blobs: Any,
    width: int,
    height: int,
    *,
    source: Image.Image | None = None,
    crop: tuple[int, int, int, int] | None = None,
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """`kind`: txt2img | img2img | inpaint. `source`: the job's input image (units
    without an image of their own use it). `crop`: inpaint's "only masked" box in
    `source` coordinates; control maps are fitted to the source, then cropped the same way."""
    if not uses_control(samples):
        yield pipe, {}
        return
    if cache is None:
        raise JobError("ControlNet and IP-Adapter are not available on this worker")
    spec = samples[0]
    cfg = spec.cfg_scale > 1
    extra: dict[str, Any] = {}
    # A unit whose guidance window is empty does nothing: leave it out of the call
    # (diffusers refuses start == end); the infotext still records it.
    live = [u for u in spec.control if u.guidance_end > u.guidance_start]
    if live:
        denoiser = model.kind.denoiser(pipe)
        nets = [cache.nets(model).get(u.name, denoiser, model.family) for u in live]
        stack = stack_units(model.kind, nets, [u.control_mode for u in live], cfg)
        index = {id(u): j for j, u in enumerate(spec.control)}
        maps: dict[tuple, Image.Image] = {}
        images = [
            [
                _control_map(
                    cache, s.control[index[id(u)]], blobs, source, width, height, crop, maps
                )
                for s in samples
            ]
            for u in live
        ]
        pipe = control_pipeline(pipe, model.kind.control_pipeline_class(kind), stack)
        extra.update(model.kind.control_arguments(kind, [_batch(i) for i in images], live))
        union = model.kind.union_modes(nets, [preprocessor_of(cache, u) for u in live])
        if union is not None:
            extra["control_mode"] = union
    with ExitStack() as stack_cm:
        if spec.reference is not None and model.kind.reference_pipeline:
            if any(s.reference != spec.reference for s in samples):
                raise JobError("only jobs with the same reference images can share a batch")
            images = [_open(blobs, sha, "reference image") for sha in spec.reference.images]
            tokens = cache.reference_tokens(model, spec.reference.name, images)
            extra["reference_tokens"] = (tokens, float(spec.reference.weight))
        elif spec.reference is not None:
            adapters = cache.ip_adapters(model, pipe)
            if any(s.reference != spec.reference for s in samples):
                raise JobError("only jobs with the same reference images can share a batch")
            images = [_open(blobs, sha, "reference image") for sha in spec.reference.images]
            extra["ip_adapter_image_embeds"] = adapters.embeddings(spec.reference.name, images, cfg)
            stack_cm.enter_context(adapters.activate(spec.reference.name, spec.reference.weight))
        yield pipe, extra


def _batch(images: list[Image.Image]) -> Any:
    """One unit's maps for the batch: the image itself when every sample shares it, else
    a (B, 3, H, W) tensor in [0, 1] (diffusers' multi-ControlNet takes no nested lists)."""
    if all(image is images[0] for image in images):
        return images[0]
    import numpy as np
    import torch

    arrays = np.stack([np.asarray(image.convert("RGB")) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0


def _open(blobs: Any, sha: str, name: str) -> Image.Image:
    if blobs is None:
        raise JobError(f"this job needs a {name} but no blob store was given")
    return open_image(blobs.get(sha), max_pixels=MAX_CONTROL_PIXELS, name=name)


def preprocessor_of(cache: ControlCache, unit: ControlUnit) -> str:
    entry = cache.config.controlnets.get(unit.name)
    default = entry.preprocessor if entry is not None else "none"
    return canonical_preprocessor(unit.preprocessor or default)


def _control_map(
    cache: ControlCache,
    unit: ControlUnit,
    blobs: Any,
    source: Image.Image | None,
    width: int,
    height: int,
    crop: tuple[int, int, int, int] | None,
    memo: dict[tuple, Image.Image],
) -> Image.Image:
    key = (unit.image, unit.settings_key(), width, height, crop)
    if key in memo:
        return memo[key]
    if unit.image is None:
        if source is None:
            raise JobError(f"ControlNet unit '{unit.name}' has no control image")
        raw = source
    else:
        raw = _open(blobs, unit.image, "control image")
    name = preprocessor_of(cache, unit)
    a, b = thresholds(unit, name)
    device = cache._nets.device if cache._nets is not None else "cpu"
    mapped = run_preprocessor(
        name,
        raw,
        res=unit.processor_res,
        threshold_a=a,
        threshold_b=b,
        depth_model=cache.config.control.depth_model,
        pose_model=cache.config.control.pose_model,
        pose_detector=cache.config.control.pose_detector,
        segmentation_model=cache.config.control.segmentation_model,
        device=device,
    )
    if crop is not None and source is not None:
        mapped = fit(mapped, source.width, source.height, unit.resize_mode)
        mapped = mapped.crop(crop).resize((width, height), Image.LANCZOS)
    else:
        mapped = fit(mapped, width, height, unit.resize_mode)
    memo[key] = mapped
    return mapped


def control_infotext(cache: ControlCache | None, spec: GenerateSpec, family: Any) -> dict[str, str]:
    """`ControlNet N` infotext entries as sd-webui-controlnet writes them; the IP-Adapter
    comes last, as the extension's ip-adapter unit."""
    if cache is None or not uses_control([spec]):
        return {}
    params: dict[str, str] = {}
    for i, unit in enumerate(spec.control):
        name = preprocessor_of(cache, unit)
        a, b = thresholds(unit, name)
        params[f"ControlNet {i}"] = unit_infotext(
            name,
            _net_label(cache, unit),
            unit.weight,
            resize_mode=unit.resize_mode,
            processor_res=unit.processor_res,
            threshold_a=a,
            threshold_b=b,
            guidance_start=unit.guidance_start,
            guidance_end=unit.guidance_end,
            control_mode=unit.control_mode,
        )
    if spec.reference is not None:
        params[f"ControlNet {len(spec.control)}"] = unit_infotext(
            family.ip_adapter_preprocessor,
            cache.ip_label(spec.reference.name),
            spec.reference.weight,
        )
    return params


def _net_label(cache: ControlCache, unit: ControlUnit) -> str:
    if cache._nets is not None:
        return cache._nets.model_label(unit.name)
    entry = cache.config.controlnets[unit.name]
    return f"{unit.name} [{file_hash(entry.source)}]"
