"""Z-Image: one Qwen3 text encoder (its chat template), a single-stream transformer,
Flux.1's VAE; CFG as `guidance_scale` (Turbo: 1, no second pass). Torch-free half:
`pipeline.contract.families.zimage`; tiny model: `zimage_tiny.py`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pipeline.contract.families.zimage import ZImage as SPEC
from pipeline.contract.families.zimage import ZImageOmni as OMNI_SPEC
from pipeline.families.flux import Flux
from pipeline.families.text_template import TextTemplateFamily


class ZImage(TextTemplateFamily):
    spec = SPEC
    transformer_class = "ZImageTransformer2DModel"
    packed = False  # its loop's latents are [batch, 16, h/8, w/8]
    # Flux.1's VAE: its latent → RGB preview factors
    preview_factors = Flux.preview_factors
    preview_bias = Flux.preview_bias
    pipelines = {
        "txt2img": "ZImagePipeline",
        "img2img": "ZImageImg2ImgPipeline",
        "inpaint": "ZImageInpaintPipeline",
    }
    # Every linear layer of each block's attention and SwiGLU MLP (the refiners' too), as
    # ai-toolkit's Z-Image LoRAs adapt them.
    training_targets = (
        "attention.to_q",
        "attention.to_k",
        "attention.to_v",
        "attention.to_out.0",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    )

    def training_text(self, pipe: Any, captions: list[str]) -> dict[str, Any]:
        """Qwen3's states of each caption through the chat template, by the pipeline's own
        `encode_prompt`: one tensor per caption, as long as its tokens."""
        embeds, _ = pipe.encode_prompt(
            prompt=list(captions),
            device=pipe._execution_device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.spec.max_prompt_tokens,
        )
        return {"embeds": list(embeds)}

    def flow_prediction(
        self, pipe: Any, noisy: Any, sigmas: Any, text: dict[str, Any], dtype: Any
    ) -> Any:
        """The transformer takes a list of [channels, 1, h, w] latents and t = 1 − σ, and
        predicts latents − noise: `ZImagePipeline` negates it, and so do we."""
        import torch

        transformer = self.denoiser(pipe)
        device = noisy.device
        latents = list(noisy.to(device, dtype).unsqueeze(2).unbind(0))
        captions = [e.to(device, dtype) for e in text["embeds"]]
        out = transformer(latents, (1 - sigmas).to(device, dtype), captions, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    # alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union, at every step (the pipeline has
    # no guidance window; the spec refuses one: `contract/families/zimage.py`).
    control_pipelines = {"txt2img": "ZImageControlNetPipeline"}
    controlnet_class = "ZImageControlNetModel"

    def controlnet_fits(self, net: Any, denoiser: Any) -> bool:
        # (its control input may be wider than the latents: Union 2.0 adds the mask)
        mine, theirs = net.config, denoiser.config
        return (mine.dim, mine.n_heads, mine.n_kv_heads) == (
            theirs.dim,
            theirs.n_heads,
            theirs.n_kv_heads,
        )

    def control_arguments(self, mode: str, images: list[Any], units: Sequence[Any]) -> dict:
        return {"control_image": images[0], "controlnet_conditioning_scale": units[0].weight}


class ZImageOmni(ZImage):
    """Z-Image Omni: txt2img and editing with reference images through one pipeline
    (its images: `TextTemplateFamily.edit_inputs`)."""

    spec = OMNI_SPEC
    pipelines = {"txt2img": "ZImageOmniPipeline", "edit": "ZImageOmniPipeline"}
    control_pipelines: dict[str, str] = {}

    def owns(self, pipe: Any) -> bool:
        return super().owns(pipe) and getattr(pipe, "siglip", None) is not None

    @contextmanager
    def call_context(self, pipe: Any, width: int, height: int) -> Iterator[None]:
        """diffusers 0.42's `ZImageOmniPipeline.prepare_image_latents` hands the VAE its
        input images as bfloat16 whatever the VAE's dtype (it runs only on a bf16 model):
        the VAE gets them in its own dtype (the same call on a bf16 model)."""
        vae = pipe.vae
        encode = vae.encode

        def in_vae_dtype(image: Any, *args: Any, **kwargs: Any) -> Any:
            return encode(image.to(vae.dtype), *args, **kwargs)

        vae.encode = in_vae_dtype
        try:
            yield
        finally:
            del vae.encode  # the class's method again
