"""Flux.2 klein: a Qwen3 causal LM (three hidden layers stacked) as the text encoder, the
Flux.2 transformer over 2×2-patchified 32-channel latents, reference images as edit
inputs; CFG only for the base (undistilled) models, with an empty negative. Torch-free
half: `pipeline.contract.families.flux2_klein`; tiny model: `flux2_klein_tiny.py`."""

from __future__ import annotations

from typing import Any

from pipeline.contract.families.flux2_klein import WIDTH_KEY, variant_mismatch
from pipeline.contract.families.flux2_klein import Flux2Klein as SPEC
from pipeline.families.text_template import TextTemplateFamily


class Flux2Klein(TextTemplateFamily):
    spec = SPEC
    transformer_class = "Flux2Transformer2DModel"
    pipelines = {
        "txt2img": "Flux2KleinPipeline",
        "edit": "Flux2KleinPipeline",
        "inpaint": "Flux2KleinInpaintPipeline",
    }
    # ComfyUI's latent_formats.Flux2: the VAE's 32 channels → RGB. The loop's tokens are
    # 128 channels (32 × a 2×2 patch, channel-major, as diffusers' `_patchify_latents`
    # orders them); `FlowFamily.preview_latents` unpacks them to [batch, 32, h/8, w/8].
    preview_factors = (
        (0.0058, 0.0113, 0.0073),
        (0.0495, 0.0443, 0.0836),
        (-0.0099, 0.0096, 0.0644),
        (0.2144, 0.3009, 0.3652),
        (0.0166, -0.0039, -0.0054),
        (0.0157, 0.0103, -0.0160),
        (-0.0398, 0.0902, -0.0235),
        (-0.0052, 0.0095, 0.0109),
        (-0.3527, -0.2712, -0.1666),
        (-0.0301, -0.0356, -0.0180),
        (-0.0107, 0.0078, 0.0013),
        (0.0746, 0.0090, -0.0941),
        (0.0156, 0.0169, 0.0070),
        (-0.0034, -0.0040, -0.0114),
        (0.0032, 0.0181, 0.0080),
        (-0.0939, -0.0008, 0.0186),
        (0.0018, 0.0043, 0.0104),
        (0.0284, 0.0056, -0.0127),
        (-0.0024, -0.0022, -0.0030),
        (0.1207, -0.0026, 0.0065),
        (0.0128, 0.0101, 0.0142),
        (0.0137, -0.0072, -0.0007),
        (0.0095, 0.0092, -0.0059),
        (0.0000, -0.0077, -0.0049),
        (-0.0465, -0.0204, -0.0312),
        (0.0095, 0.0012, -0.0066),
        (0.0290, -0.0034, 0.0025),
        (0.0220, 0.0169, -0.0048),
        (-0.0332, -0.0457, -0.0468),
        (-0.0085, 0.0389, 0.0609),
        (-0.0076, 0.0003, -0.0043),
        (-0.0111, -0.0460, -0.0614),
    )
    preview_bias = (-0.0329, -0.0718, -0.0851)

    def negative_inputs(self, negatives: list[str]) -> dict[str, Any]:
        return {}  # klein takes no negative text (the contract refuses one)

    def load_single_file(
        self, cls: Any, path: Any, torch_dtype: Any, config: str, variant: str = ""
    ) -> Any:
        """A klein transformer file (.safetensors as BFL and ComfyUI ship it, or GGUF):
        the text encoder, tokenizer and VAE come from `config`, a klein diffusers folder
        of the same size. A 9B file configured with the 4B's folder (or the reverse) is
        refused naming both, before anything is loaded."""
        import json
        from pathlib import Path

        from pipeline.contract.families import ModelError
        from pipeline.contract.families.sources import safetensors_header

        if str(path).endswith(".safetensors") and config and Path(config).is_dir():
            header = safetensors_header(Path(path))
            entry = header.get(WIDTH_KEY) or header.get(f"model.diffusion_model.{WIDTH_KEY}")
            shape = entry["shape"] if entry else None
            settings = json.loads((Path(config) / "transformer" / "config.json").read_text())
            width = settings["num_attention_heads"] * settings["attention_head_dim"]
            problem = shape and variant_mismatch(str(path), int(shape[-1]), width)
            if problem:
                raise ModelError(problem)
        return super().load_single_file(cls, path, torch_dtype, config, variant)

    # Every linear layer of the double blocks (both streams' attention and MLPs) and the
    # single blocks' fused qkv+MLP input and output, as ai-toolkit adapts Flux.2 (a
    # pattern: the double blocks' `attn.to_out` is a list whose `.0` is the layer).
    training_targets = (
        r".*\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out"
        r"|to_qkv_mlp_proj)|.*single_transformer_blocks\.\d+\.attn\.to_out"
        r"|.*\.ff(_context)?\.linear_(in|out)"
    )

    def training_latents(self, pipe: Any, pixels: Any) -> Any:
        """The VAE's means patchified 2×2 and normalised by its batch-norm statistics
        ([batch, 128, h/16, w/16]), as `Flux2KleinPipeline` encodes images."""
        import torch

        vae = pipe.vae
        means = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean.float()
        patches = pipe._patchify_latents(means)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).float()
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps)
        return (patches - mean.to(patches.device)) / std.to(patches.device)

    def training_text(self, pipe: Any, captions: list[str]) -> dict[str, Any]:
        """Qwen3's stacked hidden layers of each caption, by the pipeline's own
        `encode_prompt` (its chat template and layers)."""
        embeds, _ = pipe.encode_prompt(
            prompt=list(captions),
            device=pipe._execution_device,
            max_sequence_length=self.spec.max_prompt_tokens,
        )
        return {"embeds": embeds}

    def flow_prediction(
        self, pipe: Any, noisy: Any, sigmas: Any, text: dict[str, Any], dtype: Any
    ) -> Any:
        """Tokens of the patchified latents with their (t, h, w, l) ids and the text's, no
        guidance input (klein's pipeline passes none), back to [batch, 128, h, w]."""
        transformer = self.denoiser(pipe)
        device = noisy.device
        batch, channels, height, width = noisy.shape
        embeds = text["embeds"].to(device, dtype)
        prediction = transformer(
            hidden_states=pipe._pack_latents(noisy.to(device, dtype)),
            timestep=sigmas.to(device, dtype),
            guidance=None,
            encoder_hidden_states=embeds,
            txt_ids=pipe._prepare_text_ids(embeds).to(device),
            img_ids=pipe._prepare_latent_ids(noisy).to(device),
            return_dict=False,
        )[0]
        return prediction.float().permute(0, 2, 1).reshape(batch, channels, height, width)
