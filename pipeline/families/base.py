"""The worker half of a model family: the one place that knows how its pipelines are
built and what is inside them. One small class per family (`sd1.py`, `sdxl.py`) on
this base declares what differs, as ComfyUI's `supported_models` do, with diffusers'
per-pipeline components as the other half: which attribute holds the denoiser, which
hold the text encoders, the pipeline class per mode, the preview's latent → RGB
factors, how prompts are read from the encoders, the kohya LoRA prefixes, and the
training objective's extra conditioning. Its torch-free half (`spec`: recognition,
sizes, defaults, samplers, modes and options) is `pipeline.contract.families`.

The rest of the engine asks the family (`pipeline.families.of_pipe(pipe)` or
`family(name)`); it never compares family names or reaches for `pipe.unet`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

from pipeline.contract.families import FamilySpec
from pipeline.contract.jobs import JobError


class Family:
    """One model family, torch side. Subclasses override the class attributes."""

    spec: ClassVar[type[FamilySpec]]
    denoiser_name: ClassVar[str] = "unet"  # the pipeline attribute holding the denoiser
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    # component → the prefix kohya/A1111 LoRA files give its layers
    lora_prefixes: ClassVar[dict[str, str]] = {}
    # mode → diffusers pipeline class (img2img, inpaint derive from txt2img's modules)
    pipelines: ClassVar[dict[str, str]] = {}
    control_pipelines: ClassVar[dict[str, str]] = {}  # the same with ControlNets
    controlnet_class: ClassVar[str] = "ControlNetModel"  # diffusers' class of its ControlNets
    # Whether a single-file ControlNet loads (ours: `control.controlnet_file`, UNet ones)
    # or only a diffusers folder / Hub id does.
    controlnet_single_files: ClassVar[bool] = True
    ip_adapter_preprocessor: ClassVar[str] = ""  # sd-webui-controlnet's infotext name
    # The diffusers pipeline turning `reference` images into prompt tokens (Flux.1's
    # Redux); "": references are IP-Adapters on the denoiser's attention.
    reference_pipeline: ClassVar[str] = ""
    # Prompt embeddings: the hidden layer read (penultimate, as SDXL's pipelines do, or
    # the last through the final norm) and whether the last encoder gives a pooled one.
    penultimate_hidden_state: ClassVar[bool] = False
    pooled_text: ClassVar[bool] = False
    # A1111's "Approx cheap" preview: latent channels → RGB, and a bias.
    preview_factors: ClassVar[tuple[tuple[float, float, float], ...]] = ()
    preview_bias: ClassVar[tuple[float, float, float]] = (0.0, 0.0, 0.0)
    kohya_base_model: ClassVar[str] = ""  # `ss_base_model_version` in exported LoRAs
    # Whether prompts are read in A1111's 75-token chunks, padded to the batch's longest
    # (then jobs with different chunk counts run as separate batches).
    prompt_chunks: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        return self.spec.label

    def for_source(self, source: str) -> Family:
        """This family as the model at `source` is (Flux.1 schnell, Kontext, Fill: their
        own defaults, modes and pipelines); the family itself when it has no variants."""
        return self

    # -- what a pipeline holds -------------------------------------------------------------

    def owns(self, pipe: Any) -> bool:
        """Whether `pipe` is a pipeline of this family (by the components it holds)."""
        present = (self.denoiser_name, *self.text_encoder_names)
        return all(getattr(pipe, n, None) is not None for n in present)

    def denoiser(self, pipe: Any) -> Any:
        return getattr(pipe, self.denoiser_name)

    def swap_denoiser(self, pipe: Any, module: Any) -> None:
        """Put `module` where the pipeline looks for its denoiser, without registering it
        (not a config change: the compiled graph stands in for the call)."""
        object.__setattr__(pipe, self.denoiser_name, module)

    def text_encoders(self, pipe: Any) -> list[tuple[Any, Any]]:
        """(tokenizer, encoder) pairs, in the order their states are concatenated. A
        missing second tokenizer reuses the first (as the tiny model's folder allows)."""
        first = getattr(pipe, self.tokenizer_names[0])
        return [
            (getattr(pipe, t, None) or first, getattr(pipe, e))
            for t, e in zip(self.tokenizer_names, self.text_encoder_names)
        ]

    def adaptable(self, pipe: Any) -> list[tuple[str, Any]]:
        """(component name, module) that LoRA files and training adapt: the denoiser
        first, then the text encoders."""
        names = (self.denoiser_name, *self.text_encoder_names)
        return [(n, getattr(pipe, n)) for n in names if getattr(pipe, n, None) is not None]

    def models(self, pipe: Any) -> list[Any]:
        """Every weight-holding component: what training freezes and restores."""
        names = (self.denoiser_name, "vae", *self.text_encoder_names)
        return [getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None]

    def fused_lora_layers(self, pipe: Any) -> dict[str, list[tuple[str, int, int | None]]]:
        """A LoRA file's layers that are another module, or several, of the model (Flux.1's
        BFL names, its fused qkv): file module name → [(our module's lookup name, first
        row, end row)]; one entry with end None is a plain rename. A module named twice
        takes both row ranges in that order (BFL's final layer: its halves swapped)."""
        return {}

    def lora_refusal(self, pipe: Any, name: str, shapes: dict[str, tuple[int, ...]]) -> str | None:
        """Why a LoRA file of this family cannot go on this model, in one line (Flux.1's
        control LoRAs need a control model); None when it can."""
        return None

    # -- pipelines per mode ----------------------------------------------------------------

    def pipeline_class(self, mode: str) -> Any:
        """The diffusers class for `mode`; a mode this family lacks is refused naming it."""
        return _diffusers_class(self.pipelines, mode, self.label)

    def control_pipeline_class(self, mode: str) -> Any:
        return _diffusers_class(self.control_pipelines, mode, f"{self.label} ControlNet")

    # -- ControlNets -----------------------------------------------------------------------

    def controlnet_fits(self, net: Any, denoiser: Any) -> bool:
        """Whether a loaded ControlNet was made for this denoiser's layout (a UNet
        ControlNet: the same cross-attention width, SDXL's time embedding, block widths)."""
        mine, theirs = net.config, denoiser.config
        return (
            mine.cross_attention_dim == theirs.cross_attention_dim
            and mine.addition_embed_type == theirs.addition_embed_type
            and tuple(mine.block_out_channels) == tuple(theirs.block_out_channels)
        )

    def stack_controlnets(self, nets: list[Any]) -> Any:
        """The module the ControlNet pipeline takes for these nets; None: ours
        (`control.units.ControlStack`, with sd-webui-controlnet's control modes)."""
        return None

    def control_arguments(self, mode: str, images: list[Any], units: Sequence[Any]) -> dict:
        """The ControlNet pipeline's call arguments: each unit's map (per sample), weight
        and guidance window (diffusers' SD pipelines call txt2img's map `image`)."""
        return {
            "image" if mode == "txt2img" else "control_image": images,
            "controlnet_conditioning_scale": [float(u.weight) for u in units],
            "control_guidance_start": [float(u.guidance_start) for u in units],
            "control_guidance_end": [float(u.guidance_end) for u in units],
        }

    def union_modes(self, nets: list[Any], preprocessors: list[str]) -> list[int | None] | None:
        """Each unit's control type for union ControlNets (a number per unit); None when
        this family has none."""
        return None

    def with_reference(
        self, pipe: Any, embeds: dict[str, Any], tokens: Any, weight: float
    ) -> dict[str, Any]:
        """The prompt keywords with a reference's image tokens (`reference_pipeline`
        families only)."""
        raise JobError(f"{self.label} models take no reference tokens")

    def input_control(self, model: Any) -> str | None:
        """The preprocessor whose map of the input image a control model (`model`: its
        ModelConfig) draws from (Flux.1's Canny/Depth models); None: the input image is
        denoised from (img2img)."""
        return None

    def load_options(self) -> dict[str, Any]:
        """Extra keyword arguments for `from_pretrained`."""
        return {}

    def extra_components(self, source: str) -> dict[str, Any]:
        """Components loaded our way and passed to `from_pretrained` (Qwen-Image-Edit's
        processor without torchvision)."""
        return {}

    def load_single_file(
        self, cls: Any, path: Any, torch_dtype: Any, config: str, variant: str = ""
    ) -> Any:
        """A pipeline from one checkpoint file; the UNet families' files hold every
        component (`config`: a diffusers folder of the family, for offline loading;
        diffusers loads what the file lacks from it without a variant, so `variant` is
        never one here: `single_file_parts`)."""
        kwargs: dict[str, Any] = {"torch_dtype": torch_dtype}
        if config:
            kwargs["config"] = config
        return cls.from_single_file(str(path), **kwargs)

    def single_file_parts(self, path: Any) -> tuple[frozenset[str], bool]:
        """What a single-file checkpoint brings, for downloading its `single_file_config`
        (pipeline.models.download): the components whose weights are in the file (of
        the others, and of every component's configuration, the base is fetched), and
        whether those others load as the worker's weights variant (fp16). A UNet
        family's file holds the UNet, the VAE and, mostly, its text encoders (read from
        its keys); diffusers' `from_single_file` loads the parts it lacks without a
        variant, so they come as plain weights."""
        from pathlib import Path

        from pipeline.contract.families.weight_sizes import single_file_sizes

        try:
            held = {part.name for part in single_file_sizes(Path(path))}
        except Exception:  # noqa: BLE001 - a pickled .ckpt has no header to read: all of it
            held = {self.denoiser_name, "vae", *self.text_encoder_names}
        return frozenset(held), False

    # -- one denoising call --------------------------------------------------------------

    def scheduler(self, base_config: dict[str, Any], sampler: str, schedule: str, mode: str) -> Any:
        """The diffusers scheduler for an A1111 sampler name, from the model's config."""
        from pipeline.models.schedulers import build_scheduler

        return build_scheduler(base_config, sampler, schedule)

    @contextmanager
    def prompt_conditioning(
        self, pipe: Any, samples: Sequence[Any], steps: int, strength: float | None
    ) -> Iterator[dict[str, Any]]:
        """Keyword arguments for `pipe(...)` carrying each sample's prompt (A1111 weights,
        BREAK, prompt editing and AND: `pipeline.generate.conditioning`)."""
        from pipeline.generate.conditioning import denoising_evaluations, prompt_conditioning

        evaluations = denoising_evaluations(pipe.scheduler, steps, strength)
        with prompt_conditioning(pipe, samples, evaluations) as embeds:
            yield embeds

    def call_inputs(self, spec: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """The mode's image inputs as this family's pipelines take them (SD's img2img and
        inpaint pipelines take their size from the image)."""
        return inputs

    def guidance_arguments(self, spec: Any) -> dict[str, Any]:
        """The pipeline's guidance keywords for a job (classifier-free guidance here)."""
        return {"guidance_scale": spec.cfg_scale}

    def prompt_notices(self, pipe: Any, spec: Any) -> tuple[str, ...]:
        """What the member must know of how their prompt was read (nothing here: every
        A1111 construct has its meaning on the UNet families)."""
        return ()

    def preview_latents(self, latents: Any, pipe: Any, size: tuple[int, int]) -> Any:
        """The denoising loop's latents as [batch, channels, h, w] for the preview."""
        return latents

    def call_context(self, pipe: Any, width: int, height: int) -> Any:
        """A context every pipeline call of this family runs in (nothing by default)."""
        from contextlib import nullcontext

        return nullcontext()

    def edit_inputs(self, images: list[Any], width: int, height: int) -> Any:
        """A context giving the edit pipeline's image arguments (edit families only)."""
        raise JobError(f"{self.label} models cannot edit")

    # -- training ------------------------------------------------------------------------
    # What a personal model learns with: "denoising" (ε or v prediction on the DDPM
    # schedule, `pipeline.training.denoising`) or "flow" (flow matching,
    # `pipeline.training.flow_matching`, through the flow families' methods).
    training_objective: ClassVar[str] = "denoising"
    # The denoiser's layers a personal model adapts (peft target names): the attention
    # projections of diffusers' train_dreambooth_lora.py and kohya's MLP.
    # A tuple of module-name suffixes, or one regular expression peft full-matches.
    training_targets: ClassVar[tuple[str, ...] | str] = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
    )

    def training_scheduler(self, pipe: Any) -> Any:
        """The noise schedule training draws from: DDPM on the model's betas."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def micro_conditioning(self, pipe: Any, resolution: int, count: int) -> Any:
        """Extra conditioning the denoiser takes beside the text (SDXL's time ids)."""
        return None

    def training_latents(self, pipe: Any, pixels: Any) -> Any:
        """The VAE's posterior means of `pixels` ([-1, 1]) in the space the denoiser
        works in: (mean − shift) × scale, as the family's pipelines decode them."""
        vae = pipe.vae
        means = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean.float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (means - shift) * vae.config.scaling_factor

    def export_name(self, component: str, path: str, method: str) -> str:
        """A trained layer's name in the exported file: kohya's (`lora_unet_` + the
        module's path with `_`), which A1111, ComfyUI and diffusers read."""
        return self.lora_prefixes[component] + path.replace(".", "_")

    def training_metadata(self, pipe: Any, spec: Any) -> dict[str, str]:
        """kohya's `ss_` keys for how this family's objective trained (min-SNR γ here)."""
        return {"ss_min_snr_gamma": f"{spec.min_snr_gamma:g}"}

    def export_layout(self, spec: Any) -> str:
        """How the exported file of `spec` (a TrainSpec) stores a layer: "kohya"
        (lora_down/lora_up/alpha, or LyCORIS' names for LoHa/LoKr) or "peft"
        (lora_A/lora_B, the scale multiplied into lora_B, no alpha)."""
        return "kohya"

    def export_layers(
        self, component: str, model: Any, paths: list[str], spec: Any
    ) -> dict[str, tuple[str, ...]]:
        """The exported file's layers for the trained modules `paths` of `model`: name in
        the file → the modules it holds, in its rows' order. One module each here; a
        family whose tools fuse layers (Flux.1's qkv) names several under one."""
        return {self.export_name(component, path, spec.method): (path,) for path in paths}

    def ldm_text_encoders(self, pipe: Any) -> dict[str, Any]:
        """The text encoders' weights under their single-file (LDM) names."""
        raise NotImplementedError(f"{self.label} models cannot be exported to one file")


def _diffusers_class(table: dict[str, str], mode: str, who: str) -> Any:
    import diffusers

    name = table.get(mode)
    if name is None:
        raise JobError(f"{who} models have no {mode} mode; they have: {', '.join(table)}")
    return getattr(diffusers, name)
