"""Qwen-Image and its edit models: Qwen2.5-VL as the text encoder (the edit models also
show it the input images through its vision tower), an MMDiT over 2×2-packed latents,
true CFG (`true_cfg_scale`, the negative prompt at least a space). Torch-free half:
`pipeline.contract.families.qwen_image`; tiny models: `qwen_image_tiny.py`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.contract.families.qwen_image import QwenImage as SPEC
from pipeline.contract.families.qwen_image import QwenImageEdit as EDIT_SPEC
from pipeline.contract.families.qwen_image import QwenImageEditPlus as PLUS_SPEC
from pipeline.families.text_template import TextTemplateFamily


class QwenImage(TextTemplateFamily):
    spec = SPEC
    transformer_class = "QwenImageTransformer2DModel"
    # Its VAE is Wan 2.1's: ComfyUI's latent_formats.Wan21 (which its QwenImage model
    # uses) maps the 16 normalised channels to RGB. The loop's latents are 2×2-packed
    # tokens; `FlowFamily.preview_latents` unpacks them to [batch, 16, h/8, w/8] (the
    # VAE's frame axis exists only around encode and decode).
    preview_factors = (
        (-0.1299, -0.1692, 0.2932),
        (0.0671, 0.0406, 0.0442),
        (0.3568, 0.2548, 0.1747),
        (0.0372, 0.2344, 0.1420),
        (0.0313, 0.0189, -0.0328),
        (0.0296, -0.0956, -0.0665),
        (-0.3477, -0.4059, -0.2925),
        (0.0166, 0.1902, 0.1975),
        (-0.0412, 0.0267, -0.1364),
        (-0.1293, 0.0740, 0.1636),
        (0.0680, 0.3019, 0.1128),
        (0.0032, 0.0581, 0.0639),
        (-0.1251, 0.0927, 0.1699),
        (0.0060, -0.0633, 0.0005),
        (0.3477, 0.2275, 0.2950),
        (0.1984, 0.0913, 0.1861),
    )
    preview_bias = (-0.1835, -0.0868, -0.3360)
    pipelines = {
        "txt2img": "QwenImagePipeline",
        "img2img": "QwenImageImg2ImgPipeline",
        "inpaint": "QwenImageInpaintPipeline",
    }

    # InstantX's Qwen-Image ControlNet(-Union), one per job (diffusers' multi-ControlNet
    # of this family runs a single union net); its inpainting ControlNet is another kind
    # (the mask goes into the net).
    control_pipelines = {"txt2img": "QwenImageControlNetPipeline"}
    controlnet_class = "QwenImageControlNetModel"

    def owns(self, pipe: Any) -> bool:
        return super().owns(pipe) and getattr(pipe, "processor", None) is None

    def controlnet_fits(self, net: Any, denoiser: Any) -> bool:
        keys = ("joint_attention_dim", "in_channels", "num_attention_heads", "attention_head_dim")
        return all(net.config[k] == denoiser.config[k] for k in keys)

    def guidance_arguments(self, spec: Any) -> dict[str, Any]:
        # True CFG runs only with a negative prompt; CFG 1 is one pass.
        return {"true_cfg_scale": spec.cfg_scale}

    def negative_inputs(self, negatives: list[str]) -> dict[str, Any]:
        # The pipelines skip true CFG when no negative is given: an empty one is a space,
        # as diffusers' own examples pass.
        return {"negative_prompt": [n or " " for n in negatives]}

    # -- training --------------------------------------------------------------------------
    # Every attention projection of both streams and both MLPs of each block, as ai-toolkit
    # and diffusers' train_dreambooth_lora_qwen_image.py adapt Qwen-Image.
    training_targets = (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    )

    def training_latents(self, pipe: Any, pixels: Any) -> Any:
        """Its video VAE's means of one-frame clips, normalised by the per-channel
        statistics in its config (as `QwenImageImg2ImgPipeline` encodes an image), without
        the frame axis: [batch, 16, h/8, w/8]."""
        import torch

        vae = pipe.vae
        clips = pixels.to(vae.device, vae.dtype).unsqueeze(2)
        means = vae.encode(clips).latent_dist.mean.float()
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(means.device)
        std = torch.tensor(vae.config.latents_std).view(shape).to(means.device)
        return ((means - mean) / std).squeeze(2)

    def training_text(self, pipe: Any, captions: list[str]) -> dict[str, Any]:
        """Qwen2.5-VL's states of each caption through the chat template (the pipeline's
        own `encode_prompt`), each cut to its own tokens: one tensor per caption, padded
        per step (captions encoded apart may be padded to other lengths)."""
        embeds, mask = pipe.encode_prompt(
            prompt=list(captions),
            device=pipe._execution_device,
            max_sequence_length=self.spec.max_prompt_tokens,
        )
        if mask is None:
            return {"embeds": list(embeds)}
        return {"embeds": [e[m.bool()] for e, m in zip(embeds, mask)]}

    def flow_prediction(
        self, pipe: Any, noisy: Any, sigmas: Any, text: dict[str, Any], dtype: Any
    ) -> Any:
        """Packed 2×2 with the pipeline's helper, the text padded to the batch's longest
        caption with its mask, the image's shape per sample; unpacked, frame axis
        dropped."""
        import torch

        transformer = self.denoiser(pipe)
        device = noisy.device
        batch, channels, height, width = noisy.shape
        longest = max(len(e) for e in text["embeds"])
        width_of_text = text["embeds"][0].shape[-1]
        embeds = torch.zeros(batch, longest, width_of_text, device=device, dtype=dtype)
        mask = torch.zeros(batch, longest, device=device, dtype=torch.long)
        for row, states in enumerate(text["embeds"]):
            embeds[row, : len(states)] = states.to(device, dtype)
            mask[row, : len(states)] = 1
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.ones(batch, device=device)
        prediction = transformer(
            hidden_states=pipe._pack_latents(noisy.to(dtype), batch, channels, height, width),
            timestep=sigmas.to(device, dtype),
            guidance=guidance,
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            encoder_hidden_states=embeds,
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
            return_dict=False,
        )[0]
        scale = pipe.vae_scale_factor
        unpacked = pipe._unpack_latents(prediction, height * scale, width * scale, scale)
        return unpacked.float().squeeze(2)


class QwenImageEdit(QwenImage):
    """Qwen-Image-Edit: one input image, resized by the pipeline to the output's area."""

    spec = EDIT_SPEC
    pipelines = {
        "edit": "QwenImageEditPipeline",
        "inpaint": "QwenImageEditInpaintPipeline",
    }
    control_pipelines: dict[str, str] = {}  # no ControlNet pipeline edits

    def owns(self, pipe: Any) -> bool:
        return TextTemplateFamily.owns(self, pipe) and type(pipe).__name__.startswith(
            tuple(self.pipelines.values())
        )

    def pipeline_class(self, mode: str) -> Any:
        # The model is loaded as its edit pipeline (it has no txt2img one).
        return super().pipeline_class("edit" if mode == "txt2img" else mode)

    def extra_components(self, source: str) -> dict[str, Any]:
        """The image-only Qwen2-VL processor (no torchvision: docs/DECISIONS.md)."""
        from pipeline.models.qwen_edit import load_qwen_processor

        folder = Path(source)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, allow_patterns=["processor/*"]))
        return {"processor": load_qwen_processor(folder / "processor")}

    def call_context(self, pipe: Any, width: int, height: int) -> Any:
        """The edit pipelines resize their inputs to ~1 MP whatever the output: here to
        the output's area (the same at 1024², much faster for small outputs)."""
        from pipeline.models.qwen_edit import edit_input_area

        return edit_input_area(width * height)

    @contextmanager
    def edit_inputs(self, images: list[Any], width: int, height: int) -> Iterator[dict[str, Any]]:
        yield {"image": self._images(images)}

    def _images(self, images: list[Any]) -> Any:
        return images[0]


class QwenImageEditPlus(QwenImageEdit):
    """Qwen-Image-Edit 2509 / 2511: one to three input images."""

    spec = PLUS_SPEC
    pipelines = {
        "edit": "QwenImageEditPlusPipeline",
        "inpaint": "QwenImageEditInpaintPipeline",
    }

    def _images(self, images: list[Any]) -> Any:
        return images
