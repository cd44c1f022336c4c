"""What the flow-matching families share, worker side (Flux.1 here; Z-Image, Qwen-Image and
Flux.2 klein build on it): A1111 sampler names → flow schedulers with the model's
shift, previews of 2×2-packed latents, and the flow-matching training objective.
Torch-free half: `pipeline.contract.families.flow`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from pipeline.contract.families.flow import FLOW_SCHEDULES, resolve_flow
from pipeline.contract.jobs import JobError
from pipeline.families.base import Family

# Keys of a FlowMatchEulerDiscreteScheduler config that carry the model's shift.
_SHIFT_KEYS = (
    "use_dynamic_shifting",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
    "time_shift_type",
    "shift_terminal",
)


def flow_scheduler(base_config: dict[str, Any], sampler: str, schedule: str, mode: str) -> Any:
    """A flow scheduler for a sampler name, built on the model's FlowMatchEuler config so
    its shift carries over: fixed (`shift` → the solvers' `flow_shift`), or resolution-
    dependent (`use_dynamic_shifting` with the same base/max shift: the pipeline's `mu`
    sets it per image size, as it does for Euler)."""
    import diffusers

    found, schedule = resolve_flow(sampler, schedule)
    if found.txt2img_only and mode != "txt2img":
        raise JobError(
            f"the sampler {found.name!r} works for text-to-image only on flow models; "
            f"use Euler or UniPC for {mode}"
        )
    cls = getattr(diffusers, found.scheduler)
    config = dict(base_config)
    if found.scheduler == "FlowMatchEulerDiscreteScheduler":
        return cls.from_config(config, **FLOW_SCHEDULES[schedule])
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    solver = {k: config[k] for k in _SHIFT_KEYS if k in accepted and config.get(k) is not None}
    solver["num_train_timesteps"] = config.get("num_train_timesteps", 1000)
    solver["flow_shift"] = config.get("shift", 1.0)
    return cls.from_config({**solver, **found.options})


def unpack_latents(latents: Any, size: tuple[int, int], scale: int = 8) -> Any:
    """[batch, (h/16)·(w/16), 4·c] packed latents → [batch, c, h/8, w/8] (diffusers'
    `FluxPipeline._unpack_latents`, for a preview of any packed family)."""
    if latents.ndim != 3:
        return latents
    width, height = size
    batch, _, channels = latents.shape
    h, w = 2 * (height // (scale * 2)), 2 * (width // (scale * 2))
    latents = latents.reshape(batch, h // 2, w // 2, channels // 4, 2, 2)
    return latents.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels // 4, h, w)


def logit_normal_sigmas(count: int, generator: Any = None, mean: float = 0.0, std: float = 1.0):
    """Training timesteps as diffusers' train_dreambooth_lora_flux.py draws them with
    `--weighting_scheme logit_normal` (SD3's paper): σ = sigmoid(N(mean, std))."""
    import torch

    return torch.sigmoid(torch.normal(mean, std, size=(count,), generator=generator))


def shift_sigmas(sigmas: Any, shift: float) -> Any:
    """The model's fixed shift applied to σ ∈ (0, 1) (FlowMatchEuler's `shift`)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def dynamic_shift(config: dict[str, Any], image_seq_len: int) -> float:
    """exp(μ) for an image of `image_seq_len` packed tokens (diffusers' calculate_shift)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (top - base) / (max_len - base_len)
    return math.exp(image_seq_len * m + base - m * base_len)


class FlowFamily(Family):
    """A flow-matching transformer family: its samplers are flow schedulers, its latents
    are 2×2-packed, its objective is flow matching (target = noise − latents)."""

    denoiser_name = "transformer"
    transformer_class: ClassVar[str] = ""  # its diffusers class (single files, `owns`)
    packed: ClassVar[bool] = True  # latents in the loop are [batch, tokens, 4·channels]

    def single_file_parts(self, path: Any) -> tuple[frozenset[str], bool]:
        """A flow family's file brings its transformer alone (a ComfyUI checkpoint's text
        encoders are not read); the rest loads from the base with `from_pretrained`,
        which takes the worker's weights variant."""
        return frozenset({self.denoiser_name}), True

    def load_single_file(
        self, cls: Any, path: Any, torch_dtype: Any, config: str, variant: str = ""
    ) -> Any:
        """A transformer file as Civitai and ComfyUI ship it (.safetensors, or GGUF through
        diffusers' GGUFQuantizationConfig), converted by diffusers' single-file loader;
        the text encoders, tokenizers and VAE come from `config`, a diffusers folder or
        Hub id of the same family (`single_file_config`)."""
        from pipeline.contract.families import ModelError, label

        if not config:
            family = label(self.name)  # the family's, not a variant's ("Flux.1")
            raise ModelError(
                f"model file {path} is a {family} transformer alone: set single_file_config "
                f"to a {family} diffusers folder or Hub id for its text encoders and VAE"
            )
        import diffusers

        kwargs: dict[str, Any] = {
            "torch_dtype": torch_dtype,
            "config": config,
            "subfolder": "transformer",
        }
        if str(path).endswith(".gguf"):
            kwargs["quantization_config"] = diffusers.GGUFQuantizationConfig(
                compute_dtype=torch_dtype
            )
        model = getattr(diffusers, self.transformer_class)
        transformer = model.from_single_file(str(path), **kwargs)
        extra = self.extra_components(config)
        if variant:  # only files of that variant were downloaded
            extra["variant"] = variant
        return cls.from_pretrained(
            config, transformer=transformer, torch_dtype=torch_dtype, **extra
        )

    def scheduler(self, base_config: dict[str, Any], sampler: str, schedule: str, mode: str):
        return flow_scheduler(base_config, sampler, schedule, mode)

    def call_inputs(self, spec: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        # diffusers' flow pipelines draw at their default size (1024²) unless told.
        return {"width": spec.width, "height": spec.height, **inputs}

    def preview_latents(self, latents: Any, pipe: Any, size: tuple[int, int]) -> Any:
        if not self.packed:
            return latents
        return unpack_latents(latents, size, getattr(pipe, "vae_scale_factor", 8))

    # -- training (`pipeline.training.flow_matching` asks these) ---------------------------

    training_objective = "flow"

    def flow_target(self, noise: Any, latents: Any) -> Any:
        """What the transformer learns to predict at σ: the velocity noise − latents."""
        return noise - latents

    def training_scheduler(self, pipe: Any) -> Any:
        """A FlowMatchEuler schedule from the model's config: its σ table holds the
        model's fixed shift (built once per job; `training_sigmas` indexes it)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def training_sigmas(self, schedule: Any, count: int, generator: Any) -> Any:
        """σ of `count` training samples as diffusers' train_dreambooth_lora_flux.py draws
        them (`--weighting_scheme logit_normal`): u = sigmoid(N(0, 1)), then the σ at
        index ⌊u·1000⌋ of `schedule` (`training_scheduler`), which holds the model's
        fixed shift (a model with resolution-dependent shift, such as Flux.1 dev, trains
        on unshifted σ there too)."""
        import torch

        u = logit_normal_sigmas(count, generator)
        steps = schedule.config.num_train_timesteps
        indices = (u * steps).long().clamp(max=steps - 1)
        return schedule.sigmas[indices].to(torch.float32)

    def training_text(self, pipe: Any, captions: list[str]) -> dict[str, Any]:
        """The frozen text encoders' conditioning for each caption, batch first (a tensor
        or a list with one entry per caption): encoded once, indexed per step."""
        raise NotImplementedError(f"{self.label} models cannot be trained yet")

    def flow_prediction(
        self, pipe: Any, noisy: Any, sigmas: Any, text: dict[str, Any], dtype: Any
    ) -> Any:
        """The transformer's velocity (noise − latents convention) for unpacked noisy
        latents at σ, in the latents' shape, as float32. Its inputs go in `dtype` (the
        transformer's compute dtype, which the caller knows: diffusers' `ModelMixin.dtype`
        walks the modules, about 1 ms a call on a tiny model), on the latents' device."""
        raise NotImplementedError(f"{self.label} models cannot be trained yet")

    def export_name(self, component: str, path: str, method: str) -> str:
        """LoRA: diffusers' and ai-toolkit's `transformer.<module>` (peft layout), which
        diffusers' `load_lora_weights` reads for every flow family and ComfyUI reads for
        Flux.1. LoHa/LoKr: LyCORIS's own wrapper's `lycoris_<module with _>` (SimpleTuner's
        files), which ComfyUI reads; diffusers loads no LyCORIS file for these families."""
        if method == "lora":
            return f"{component}.{path}"
        return "lycoris_" + path.replace(".", "_")

    def export_layout(self, spec: Any) -> str:
        return "peft" if spec.method == "lora" else "kohya"

    def training_metadata(self, pipe: Any, spec: Any) -> dict[str, str]:
        """kohya's name for σ = sigmoid(N(0, 1)) (sd-scripts' `--timestep_sampling
        sigmoid`), and the guidance a guidance-distilled model trained at."""
        metadata = {"ss_timestep_sampling": "sigmoid", "ss_model_prediction_type": "raw"}
        guidance = getattr(self.spec, "train_guidance", None)
        if guidance is not None and getattr(self.denoiser(pipe).config, "guidance_embeds", False):
            metadata["ss_guidance_scale"] = f"{guidance:g}"
        return metadata
