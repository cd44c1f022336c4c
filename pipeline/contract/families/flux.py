"""Flux.1 (dev, Krea, schnell, Kontext, Fill), torch-free: see `base.py` and `flow.py`.

A 12B rectified-flow transformer reading CLIP-L (pooled, 77 tokens) and T5-XXL (512
tokens; schnell 256), 16 latent channels packed 2×2, sizes in multiples of 16. dev,
Krea, Kontext and Fill are guidance-distilled: "Distilled CFG Scale" (Forge's name) is
an input of the transformer, and true classifier-free guidance (a negative prompt) is
off unless the member asks for it with a CFG scale above 1. schnell is timestep-
distilled: 1–4 steps, no guidance, no negative prompt.

Variants share the family's name (`family = "flux"`) and differ in defaults and modes;
`Flux.for_source(source)` reads which one a model is from its files.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, ClassVar

from pipeline.contract.families.flow import FlowSpec
from pipeline.contract.jobs import JobError

# diffusers' pipeline classes a Flux.1 folder's model_index.json names.
PIPELINE_CLASSES = (
    "FluxPipeline",
    "FluxImg2ImgPipeline",
    "FluxInpaintPipeline",
    "FluxFillPipeline",
    "FluxKontextPipeline",
    "FluxKontextInpaintPipeline",
    "FluxControlPipeline",
    "FluxControlNetPipeline",
)
# A single-file transformer's keys as BFL, Civitai and ComfyUI ship them, with or
# without ComfyUI's checkpoint prefix.
CHECKPOINT_PREFIX = "model.diffusion_model."


class Flux(FlowSpec):
    name = "flux"
    memory_profile = "flux1"
    label = "Flux.1"
    variant: ClassVar[str] = "dev"
    modes = frozenset({"txt2img", "img2img", "inpaint", "outpaint", "upscale", "facefix"})
    # true CFG (negative prompt + CFG scale > 1) and Distilled CFG; no CLIP skip (Forge
    # has none for Flux); ControlNets (FluxControlNetPipeline and its img2img/inpaint);
    # Redux as the reference image.
    options = frozenset(
        {"negative_prompt", "cfg_scale", "guidance", "face_fix", "control", "reference"}
    )
    size_multiple = 16
    default_size = 1024
    train_resolution = 512  # diffusers' train_dreambooth_lora_flux.py
    # Person LoRAs on Flux.1 dev (ai-toolkit's train_lora_flux_24gb example: linear 16,
    # linear_alpha 16, lr 1e-4), trained at the guidance diffusers' README passes (1).
    train_rank = 16
    train_alpha = 16.0
    train_guidance: ClassVar[float] = 1.0
    default_steps = 28
    default_cfg = 1.0  # true CFG off: Forge's default for Flux
    default_guidance = 3.5
    t5_tokens: ClassVar[int] = 512
    clip_tokens: ClassVar[int] = 77
    max_steps: ClassVar[int | None] = None
    # Why a variant that needs an input image refuses txt2img (after its label); "": none.
    txt2img_refusal: ClassVar[str] = ""
    # kohya/ComfyUI (`lora_unet_double_blocks_…`), BFL/ComfyUI (`diffusion_model.…`),
    # XLabs and BFL's control LoRAs (bare `double_blocks.…`) and diffusers/ai-toolkit
    # (`transformer.single_transformer_blocks.…`) LoRA names.
    single_file_text_encoders = ("text_encoders.clip_l.", "text_encoders.t5xxl.")  # ComfyUI's
    lora_key_prefixes = (
        "lora_unet_double_blocks_",
        "lora_unet_single_blocks_",
        "diffusion_model.double_blocks.",
        "diffusion_model.single_blocks.",
        "double_blocks.",  # XLabs (`double_blocks.0.processor.qkv_lora1`), BFL's control LoRAs
        "single_blocks.",
        "transformer.single_transformer_blocks.",
        "lora_transformer_single_transformer_blocks_",
        "lycoris_single_transformer_blocks_",  # LyCORIS's wrapper (SimpleTuner)
    )

    @classmethod
    def matches_index(cls, index: Mapping[str, Any]) -> bool:
        return index.get("_class_name", "") in PIPELINE_CLASSES

    @classmethod
    def matches_checkpoint(cls, keys: Collection[str]) -> bool:
        """BFL's layout: double_blocks/single_blocks, with the key diffusers' own
        `infer_diffusers_model_type` reads as Flux.1, and none of the names that make a
        file Flux.2 or Chroma (which share the block names)."""
        names = {k.removeprefix(CHECKPOINT_PREFIX) for k in keys}
        others = (
            "single_stream_modulation.",
            "distilled_guidance_layer.",
            "early_stream_modulations.",
        )
        return (
            "double_blocks.0.img_attn.norm.key_norm.scale" in names
            and any(k.startswith("single_blocks.") for k in names)
            and not any(k.startswith(others) for k in names)
        )

    @classmethod
    def for_source(cls, source: str) -> type[Flux]:
        return VARIANTS[variant_of(source)]

    @classmethod
    def check_mode(cls, mode: str) -> None:
        if mode == "txt2img" and cls.txt2img_refusal:
            raise JobError(f"{cls.label} {cls.txt2img_refusal}")
        super().check_mode(mode)

    @classmethod
    def check_job(cls, spec: Any) -> None:
        """Refuse, in one line naming the model, what this variant cannot do."""
        cls.check_mode(spec.mode)
        if spec.mode == "txt2img" and (spec.width % 16 or spec.height % 16):
            raise JobError(
                f"{cls.label} sizes must be multiples of 16, not {spec.width}×{spec.height}; "
                f"try {max(spec.width // 16, 1) * 16}×{max(spec.height // 16, 1) * 16}"
            )
        if cls.max_steps is not None and spec.steps > cls.max_steps:
            raise JobError(
                f"{cls.label} is distilled for 1–4 steps; {spec.steps} is more than its "
                f"{cls.max_steps}: ask for 4"
            )
        if "negative_prompt" not in cls.options and spec.negative_prompt.strip():
            raise JobError(
                f"{cls.label} has no classifier-free guidance, so a negative prompt cannot "
                "work: leave it empty"
            )

    @classmethod
    def guidance_of(cls, spec: Any) -> float | None:
        """The Distilled CFG a job runs at: its own, else the variant's default."""
        if "guidance" not in cls.options:
            return None
        given = getattr(spec, "guidance", None)
        return cls.default_guidance if given is None else given


class FluxSchnell(Flux):
    label = "Flux.1 schnell"
    variant = "schnell"
    train_refusal = "it is step-distilled; train on a Flux.1 dev (or Krea) model"
    options = frozenset({"face_fix"})
    default_steps = 4
    default_guidance = None
    t5_tokens = 256
    max_steps = 10


class FluxKontext(Flux):
    label = "Flux.1 Kontext"
    variant = "kontext"
    # img2img and edit are the same call: the input image edited as the prompt says
    modes = frozenset({"img2img", "edit"})
    # diffusers has no Kontext ControlNet pipeline; Kontext's reference is its input image.
    options = Flux.options - {"control", "reference"}
    default_guidance = 2.5
    txt2img_refusal = "edits an image: give it an input image (img2img) and say what to change"
    train_refusal = "it edits images; train on a Flux.1 dev (or Krea) model"


class FluxFill(Flux):
    label = "Flux.1 Fill"
    variant = "fill"
    modes = frozenset({"inpaint", "outpaint", "facefix"})
    options = Flux.options - {"control"}  # nor a Fill one
    default_guidance = 30.0  # BFL's and diffusers' example for FLUX.1-Fill-dev
    train_refusal = "it fills masks; train on a Flux.1 dev (or Krea) model"


class FluxControl(Flux):
    """BFL's Flux Tools Canny/Depth dev: a transformer whose input is the noise beside the
    control image's latents (in_channels 128), through `FluxControlPipeline`. A member
    picks it as a configured model and gives a photo; its edges or depth map (the
    preprocessor by the model's name, as BFL names them) guide a new image."""

    label = "Flux.1 Control"
    variant = "control"
    modes = frozenset({"img2img"})  # the input photo's map, drawn anew
    options = Flux.options - {"control"}  # the control map is the input's
    default_guidance = 10.0  # diffusers' FLUX.1-Depth-dev example (Canny's takes 30)
    txt2img_refusal = "models draw from a photo's edges or depth: give it an input image (img2img)"
    train_refusal = "it draws from control maps; train on a Flux.1 dev (or Krea) model"


VARIANTS: dict[str, type[Flux]] = {
    s.variant: s for s in (Flux, FluxSchnell, FluxKontext, FluxFill, FluxControl)
}
# model_index.json class names of the control variant (not FluxControlNet…, a dev model).
CONTROL_PIPELINES = (
    "FluxControlPipeline",
    "FluxControlImg2ImgPipeline",
    "FluxControlInpaintPipeline",
)


def variant_of(source: str) -> str:
    """ "dev", "schnell", "kontext", "fill" or "control", from a folder's files, a single file's
    or a GGUF's tensor names and shapes, or a Hub id's name (Krea is a dev)."""
    path = Path(source)
    if path.is_dir():
        index = _json(path / "model_index.json")
        name = index.get("_class_name", "")
        if "Kontext" in name:
            return "kontext"
        if "Fill" in name:
            return "fill"
        if name in CONTROL_PIPELINES:
            return "control"
        transformer = _json(path / "transformer" / "config.json")
        if transformer.get("in_channels") == 384:
            return "fill"
        if transformer.get("in_channels") == 128:
            return "control"
        return "dev" if transformer.get("guidance_embeds", True) else "schnell"
    if path.suffix in (".safetensors", ".gguf") and path.exists():
        names = {k.removeprefix(CHECKPOINT_PREFIX): shape for k, shape in _shapes(path).items()}
        image_in = names.get("img_in.weight", [0, 64])
        if image_in[-1] == 384:
            return "fill"
        if image_in[-1] == 128:
            return "control"
        if not any(k.startswith("guidance_in.") for k in names):
            return "schnell"
    lowered = path.name.lower() if path.suffix else source.lower()
    for variant in ("schnell", "kontext", "fill"):
        if variant in lowered:
            return variant
    if any(tool in lowered for tool in ("canny", "depth")) and "lora" not in lowered:
        return "control"  # FLUX.1-Canny-dev, FLUX.1-Depth-dev (their -lora is for dev)
    return "dev"


def _shapes(path: Path) -> dict[str, list[int]]:
    """A single file's or a GGUF's tensor shapes, from its header (a renamed schnell GGUF
    is still a schnell: it has no guidance embedder)."""
    from pipeline.contract.families.sources import gguf_tensor_shapes, safetensors_header

    if path.suffix == ".gguf":
        return gguf_tensor_shapes(path)[1]
    return {name: info.get("shape", []) for name, info in safetensors_header(path).items()}


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
