"""Flux.1 (dev, Krea, schnell, Kontext, Fill), worker side: a `FluxTransformer2DModel`
reading CLIP-L's pooled output and T5's states, 2×2-packed 16-channel latents, a
flow-matching Euler scheduler with the model's (resolution-dependent) shift.
Torch-free half: `pipeline.contract.families.flux`; tiny model: `flux_tiny.py`.

How a prompt is read (docs/DECISIONS.md, issue 23, following Forge where it has an
answer): the text goes to both encoders as one string, as diffusers and Forge do;
A1111 emphasis weights scale T5's states as Forge's T5 engine does ("Original"
emphasis; CLIP gives only its pooled vector, which weights do not touch); prompt
editing and alternation change the text over the steps (the transformer is given each
step's embeddings); BREAK and AND have no effect and the member is told so with the
result; a prompt longer than CLIP's 77 or T5's 512 (schnell 256) tokens is cut there,
and the member is told.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pipeline.contract.families.flux import VARIANTS
from pipeline.contract.families.flux import Flux as SPEC
from pipeline.contract.jobs import JobError
from pipeline.contract.prompt_schedule import plan_prompt, split_and, text_at_step
from pipeline.contract.prompt_syntax import parse_prompt_attention, strip_loras
from pipeline.families.base import Family
from pipeline.families.flow import FlowFamily


class Flux(FlowFamily):
    spec = SPEC
    transformer_class = "FluxTransformer2DModel"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    pipelines = {
        "txt2img": "FluxPipeline",
        "img2img": "FluxImg2ImgPipeline",
        "inpaint": "FluxInpaintPipeline",
    }
    # ComfyUI's latent_formats.Flux: the 16 channels → RGB, and a bias.
    preview_factors = (
        (-0.0346, 0.0244, 0.0681),
        (0.0034, 0.0210, 0.0687),
        (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329),
        (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915),
        (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421),
        (-0.0515, 0.0201, 0.0011),
        (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749),
        (-0.1264, -0.0522, -0.1103),
        (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    )
    preview_bias = (-0.0329, -0.0718, -0.0851)
    # InstantX, Union (InstantX/Shakker) and XLabs-style ControlNets, diffusers' classes.
    control_pipelines = {
        "txt2img": "FluxControlNetPipeline",
        "img2img": "FluxControlNetImg2ImgPipeline",
        "inpaint": "FluxControlNetInpaintPipeline",
    }
    controlnet_class = "FluxControlNetModel"
    controlnet_single_files = False  # XLabs' own files need a converter diffusers lacks
    reference_pipeline = "FluxPriorReduxPipeline"  # FLUX.1-Redux-dev
    ip_adapter_preprocessor = "flux_redux"
    kohya_base_model = "flux1"
    prompt_chunks = False  # CLIP 77 and T5 512 tokens, fixed lengths
    # kohya's sd-scripts name the transformer `lora_unet_` and CLIP-L `lora_te1_`.
    lora_prefixes = {
        "transformer": "lora_unet_",
        "text_encoder": "lora_te1_",
        "text_encoder_2": "lora_te2_",
    }

    # diffusers' train_dreambooth_lora_flux.py default `--lora_layers`: every attention
    # projection of both streams and both MLPs of the double blocks (the single blocks'
    # q/k/v match "attn.to_q"… too).
    training_targets = (
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )

    def owns(self, pipe: Any) -> bool:
        name = type(pipe).__name__
        return name.startswith("Flux") and not name.startswith("Flux2") and super().owns(pipe)

    def for_source(self, source: str) -> Flux:
        return _VARIANT_FAMILIES[self.spec.for_source(source).variant]

    # -- loading ---------------------------------------------------------------------------

    def fused_lora_layers(self, pipe: Any) -> dict[str, list[tuple[str, int, int | None]]]:
        """A Flux.1 LoRA file's layer names → diffusers' modules, as diffusers' converters
        map them: BFL's names (`double_blocks.0.img_attn.qkv`, with ComfyUI's
        `diffusion_model.` or kohya's `lora_unet_…_` spelling: `_convert_kohya_flux_lora_
        to_diffusers`, `_convert_bfl_flux_control_lora_to_diffusers`), XLabs' processors
        (`double_blocks.0.processor.qkv_lora1`: `_convert_xlabs_flux_lora_to_diffusers`)
        and LyCORIS's wrapper. The fused qkv and single-block linear1 are split at this
        model's own widths (diffusers hard-codes the 12B model's 3072/12288)."""
        transformer = self.denoiser(pipe)
        config = transformer.config
        inner = config.num_attention_heads * config.attention_head_dim
        mlp = int(inner * 4.0)  # FluxSingleTransformerBlock's mlp_ratio
        t = "transformer."
        fused: dict[str, list[tuple[str, int, int | None]]] = {}

        def split(names: list[str], targets: list[str], widths: list[int]) -> None:
            bounds, start = [], 0
            for target, width in zip(targets, widths):
                bounds.append((t + target, start, start + width))
                start += width
            for name in names:
                fused[name] = bounds

        def spellings(bfl: str) -> list[str]:
            """BFL's dotted name as kohya, BFL and ComfyUI files write it."""
            return ["lora_unet_" + bfl.replace(".", "_"), bfl, "diffusion_model." + bfl]

        def rename(bfl: str, target: str) -> None:
            for name in spellings(bfl):
                fused[name] = [(t + target, 0, None)]

        for bfl, target in _GLOBAL_LAYERS:
            rename(bfl, target)
        # BFL's final modulation is (shift, scale); diffusers' norm_out.linear is (scale,
        # shift): its converter swaps the halves (`swap_scale_shift`).
        half = transformer.norm_out.linear.out_features // 2
        norm_out = f"{t}norm_out.linear"
        for name in spellings("final_layer.adaLN_modulation.1"):
            fused[name] = [(norm_out, half, 2 * half), (norm_out, 0, half)]
        for i in range(config.num_layers):
            at, block = f"double_blocks.{i}.", f"transformer_blocks.{i}."
            for stream, targets in (("img", _IMAGE_QKV), ("txt", _TEXT_QKV)):
                names = [*spellings(f"{at}{stream}_attn.qkv")]
                names += [f"{p}{at}processor.qkv_lora{1 if stream == 'img' else 2}" for p in _XLABS]
                split(names, [block + x for x in targets], [inner] * 3)
            for theirs, ours in _DOUBLE_LAYERS:
                rename(at + theirs, block + ours)
            for prefix in _XLABS:
                fused[f"{prefix}{at}processor.proj_lora1"] = [(f"{t}{block}attn.to_out.0", 0, None)]
                fused[f"{prefix}{at}processor.proj_lora2"] = [
                    (f"{t}{block}attn.to_add_out", 0, None)
                ]
        for i in range(config.num_single_layers):
            at, block = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
            qkv = [block + x for x in _IMAGE_QKV]
            split(spellings(at + "linear1"), [*qkv, block + "proj_mlp"], [inner] * 3 + [mlp])
            split([f"{p}{at}processor.qkv_lora" for p in _XLABS], qkv, [inner] * 3)
            for theirs, ours in _SINGLE_LAYERS:
                rename(at + theirs, block + ours)
            for prefix in _XLABS:
                fused[f"{prefix}{at}processor.proj_lora"] = [(f"{t}{block}proj_out", 0, None)]
        # LyCORIS's own wrapper (SimpleTuner's Flux LoKr/LoHa files) names the
        # transformer's modules `lycoris_<diffusers path>`.
        for path, _ in transformer.named_modules():
            if path:
                fused["lycoris_" + path.replace(".", "_")] = [(t + path, 0, None)]
        return fused

    def lora_refusal(self, pipe: Any, name: str, shapes: dict[str, tuple[int, ...]]) -> str | None:
        """BFL's Canny/Depth LoRAs widen the image input (`img_in` reads the control image's
        latents beside the noise): they make a control model, and do nothing sensible on
        a model whose input is the noise alone."""
        inputs = self.denoiser(pipe).x_embedder.in_features
        for prefix in ("", "diffusion_model.", "lora_unet_"):
            for factor in ("lora_A.weight", "lora_down.weight"):
                shape = shapes.get(f"{prefix}img_in.{factor}")
                if shape is not None and shape[-1] != inputs:
                    return (
                        f"LoRA '{name}' is a {self.spec.label} Control LoRA (Canny/Depth: its "
                        f"input reads {shape[-1]} channels, this model's {inputs}); it works on "
                        "a Flux.1 control model (FLUX.1-Canny-dev, FLUX.1-Depth-dev)"
                    )
        return None

    def with_reference(
        self, pipe: Any, embeds: dict[str, Any], tokens: Any, weight: float
    ) -> dict[str, Any]:
        """Redux as `FluxPriorReduxPipeline` hands it to FluxPipeline: the image tokens
        after T5's, and the whole (text, tokens and CLIP's pooled vector) times the
        weight (its `prompt_embeds_scale`, `pooled_prompt_embeds_scale`). Several images'
        tokens are averaged, as diffusers' sum at scales weight / n gives them. Under
        prompt editing every step's text gets the same tokens."""
        text = embeds["prompt_embeds"]
        joined = {
            **embeds,
            "prompt_embeds": _with_tokens(text, tokens, weight),
            "pooled_prompt_embeds": embeds["pooled_prompt_embeds"] * weight,
        }
        for module in (self.denoiser(pipe), getattr(pipe, "controlnet", None)):
            scheduled = module.__dict__.get("forward") if module is not None else None
            if isinstance(scheduled, _ScheduledForward):
                scheduled.positive = joined["prompt_embeds"]
                scheduled.embeds = _with_tokens(scheduled.embeds, tokens, weight)
                scheduled.pooled = scheduled.pooled * weight
        return joined

    def controlnet_fits(self, net: Any, denoiser: Any) -> bool:
        """The net reads the transformer's input, heads, text and pooled widths."""
        keys = (
            "in_channels",
            "num_attention_heads",
            "attention_head_dim",
            "joint_attention_dim",
            "pooled_projection_dim",
        )
        return all(net.config.get(k) == denoiser.config.get(k) for k in keys)

    def stack_controlnets(self, nets: list[Any]) -> Any:
        from diffusers import FluxMultiControlNetModel

        return FluxMultiControlNetModel(nets)

    def control_arguments(self, mode: str, images: list[Any], units: Sequence[Any]) -> dict:
        """diffusers' Flux ControlNet pipelines take `control_image` in every mode; A1111's
        control modes reweight a UNet's residuals, which these nets do not make."""
        odd = next((u.control_mode for u in units if u.control_mode != "Balanced"), None)
        if odd is not None:
            raise JobError(
                f"{self.spec.label} ControlNets have no control mode {odd!r} (A1111's modes "
                "reweight a UNet's residuals): use Balanced"
            )
        arguments = super().control_arguments(mode, images, units)
        arguments.pop("image", None)  # SD's txt2img name for the maps
        return {**arguments, "control_image": images}

    def union_modes(self, nets: list[Any], preprocessors: list[str]) -> list[int | None] | None:
        """A union ControlNet's control type per unit, from the unit's preprocessor
        (InstantX's FLUX.1-dev-Controlnet-Union numbering, which Shakker-Labs' Union-Pro
        keeps); a non-union net takes None. Always a list: diffusers' Flux ControlNet
        img2img and inpaint pipelines build no mode at all from `control_mode=None` for a
        FluxMultiControlNetModel, and its forward then runs no net."""
        modes: list[int | None] = []
        for net, name in zip(nets, preprocessors):
            if not net.config.get("num_mode"):
                modes.append(None)
            elif name in UNION_MODES:
                modes.append(UNION_MODES[name])
            else:
                raise JobError(
                    f"a {self.spec.label} union ControlNet needs to know the map's kind, and "
                    f"'{name}' is none it knows: pick {', '.join(UNION_MODES)}"
                )
        return modes

    # -- training --------------------------------------------------------------------------

    def training_text(self, pipe: Any, captions: list[str]) -> dict[str, Any]:
        """T5's states and CLIP's pooled output of each caption, by the pipeline's own
        `encode_prompt` (T5 at the variant's length), as diffusers' script caches them."""
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=captions,
            prompt_2=captions,
            device=pipe._execution_device,
            max_sequence_length=self.spec.t5_tokens,
        )
        return {"embeds": embeds, "pooled": pooled}

    def flow_prediction(
        self, pipe: Any, noisy: Any, sigmas: Any, text: dict[str, Any], dtype: Any
    ) -> Any:
        """Packed 2×2 with the pipeline's own helpers, the text's and the image's position
        ids, and a guidance-distilled model's guidance input at `train_guidance` (1, as
        diffusers' README trains Flux.1 dev); unpacked back to [batch, 16, h, w]."""
        import torch

        transformer = self.denoiser(pipe)
        device = noisy.device  # the transformer's (diffusers' `.device` walks the modules)
        batch, channels, height, width = noisy.shape
        packed = pipe._pack_latents(noisy.to(dtype), batch, channels, height, width)
        image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        embeds = text["embeds"].to(device, dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.spec.train_guidance, device=device)
        prediction = transformer(
            hidden_states=packed,
            timestep=sigmas.to(device, dtype),
            guidance=guidance,
            pooled_projections=text["pooled"].to(device, dtype),
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=image_ids,
            return_dict=False,
        )[0]
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(prediction, height * scale, width * scale, scale).float()

    def export_layout(self, spec: Any) -> str:
        """A LoRA under kohya's sd-scripts names unless `[training] flux_lora_layout` asks
        for diffusers' peft layout; LoHa/LoKr under LyCORIS's names either way (a fused
        layer cannot hold three separate Kronecker products exactly)."""
        return "kohya" if _kohya_names(spec) else super().export_layout(spec)

    def export_layers(
        self, component: str, model: Any, paths: list[str], spec: Any
    ) -> dict[str, tuple[str, ...]]:
        """kohya's layout: sd-scripts' `lora_unet_<BFL layer>` (networks/lora_flux.py); the
        double blocks' `img_attn_qkv`/`txt_attn_qkv` hold diffusers' q, k, v and the single
        blocks' `linear1` their q, k, v and MLP input, in that row order, trained or not."""
        if not _kohya_names(spec):
            return super().export_layers(component, model, paths, spec)
        if component != self.denoiser_name:  # CLIP-L: `lora_te1_…`, as for SD
            return {Family.export_name(self, component, p, spec.method): (p,) for p in paths}
        config = model.config
        names = kohya_layer_names(config.num_layers, config.num_single_layers)
        trained = set(paths)
        layers = {name: parts for name, parts in names.items() if trained & set(parts)}
        unnamed = trained.difference(*layers.values())
        if unnamed:
            raise ValueError(f"no kohya name for the trained layer(s) {', '.join(sorted(unnamed))}")
        return layers

    def training_metadata(self, pipe: Any, spec: Any) -> dict[str, str]:
        """The keys sd-scripts' `flux_train_network.py` adds (`update_metadata`: how σ was
        drawn, the guidance, T5's mask) and its ModelSpec's architecture; in kohya's
        layout the network module that reads it and the `split_qkv` its fused layers
        are written as."""
        metadata = {
            **super().training_metadata(pipe, spec),
            "ss_model_type": "flux",
            "ss_weighting_scheme": "none",  # σ = sigmoid(N(0, 1)), every σ weighed 1
            "ss_sigmoid_scale": "1.0",
            "ss_apply_t5_attn_mask": "False",  # FluxPipeline's encode_prompt masks nothing
            "modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": "flux-1-dev/lora",  # dev and Krea train; see train_refusal
            "modelspec.implementation": "https://github.com/black-forest-labs/flux",
            "modelspec.title": spec.name,
            "modelspec.resolution": f"{spec.resolution}x{spec.resolution}",
        }
        if _kohya_names(spec):
            metadata["ss_network_module"] = "networks.lora_flux"
            metadata["ss_network_args"] = json.dumps({"split_qkv": "True"})
            metadata["sdbot_layout"] = (
                "kohya: sd-scripts' lora_flux names, fused qkv/linear1 as split_qkv writes "
                "them, alpha = parts x alpha so that alpha / rank is the trained scale"
            )
        return metadata

    # -- one denoising call ----------------------------------------------------------------

    def guidance_arguments(self, spec: Any) -> dict[str, Any]:
        """Distilled CFG as `guidance_scale` (the transformer's guidance input), and true
        CFG (`true_cfg_scale`) only when a negative prompt is given with CFG scale > 1."""
        args: dict[str, Any] = {}
        guidance = self.spec.guidance_of(spec)
        if guidance is not None:
            args["guidance_scale"] = guidance
        if _true_cfg(self.spec, spec):
            args["true_cfg_scale"] = spec.cfg_scale
        return args

    def prompt_notices(self, pipe: Any, spec: Any) -> tuple[str, ...]:
        notices = []
        prompt = strip_loras(spec.prompt)
        read = _read(prompt)
        if read.breaks:
            notices.append(f"BREAK has no effect on {self.spec.label}; it was left out")
        if read.ands:
            notices.append(
                f"AND has no effect on {self.spec.label} (no unconditional prediction to compose "
                "against); its parts were read as one prompt"
            )
        if spec.negative_prompt.strip() and not _true_cfg(self.spec, spec):
            notices.append(
                "the negative prompt had no effect: it needs a CFG scale above 1 (true CFG, "
                "about twice as slow)"
            )
        for label, tokenizer, limit in (
            ("CLIP", pipe.tokenizer, self.spec.clip_tokens),
            ("T5", pipe.tokenizer_2, self.spec.t5_tokens),
        ):
            longest = max(len(tokenizer(t)["input_ids"]) for t in read.texts)
            if longest > limit:
                notices.append(
                    f"your prompt is {longest} {label} tokens; {self.spec.label} reads "
                    f"{limit}, the rest was cut"
                )
        return tuple(notices)

    @contextmanager
    def prompt_conditioning(
        self, pipe: Any, samples: Sequence[Any], steps: int, strength: float | None
    ) -> Iterator[dict[str, Any]]:
        """Each sample's CLIP pooled and T5 embeddings, encoded by the pipeline's own
        `encode_prompt` (so a plain prompt gives diffusers' very embeddings); when a
        prompt changes over the steps, the transformer gets each step's rows."""
        import torch

        if strength:  # diffusers' get_timesteps: the steps img2img/inpaint really run
            steps = max(steps - int(max(steps - steps * strength, 0)), 1)
        plans = [
            plan_prompt(_read(strip_loras(s.prompt)).text, strip_loras(s.negative_prompt), steps)
            for s in samples
        ]
        schedules = [plan.parts[0][1] for plan in plans]
        table = list(dict.fromkeys(text for sched in schedules for _, text in sched))
        embeds, pooled = self._encode(pipe, table)
        rows = [[(last, table.index(text)) for last, text in sched] for sched in schedules]
        first = [r[0][1] for r in rows]
        kwargs = {"prompt_embeds": embeds[first], "pooled_prompt_embeds": pooled[first]}
        if any(_true_cfg(self.spec, s) for s in samples):
            negatives = [text_at_step(list(plan.negative), 0) for plan in plans]
            neg_embeds, neg_pooled = self._encode(pipe, negatives)
            kwargs["negative_prompt_embeds"] = neg_embeds
            kwargs["negative_pooled_prompt_embeds"] = neg_pooled
        if all(len(r) == 1 for r in rows):
            yield kwargs
            return
        # The transformer and a ControlNet (which the pipeline hands the same step-0
        # embeddings, once per step before the transformer) each get the step's rows.
        modules = [self.denoiser(pipe), getattr(pipe, "controlnet", None)]
        modules = [module for module in modules if module is not None]
        owns = [module.__dict__.get("forward") for module in modules]
        positive = kwargs["prompt_embeds"]
        for module in modules:
            module.forward = _ScheduledForward(module.forward, positive, embeds, pooled, rows)
        try:
            with torch.inference_mode():
                yield kwargs
        finally:
            for module, own in zip(modules, owns):
                if own is None:
                    del module.forward
                else:
                    module.forward = own

    def _encode(self, pipe: Any, texts: list[str]) -> tuple[Any, Any]:
        """CLIP's pooled and T5's states of each text through the pipeline's own
        `encode_prompt` (weight brackets removed); a text with A1111 weights then gets
        its T5 states as Forge's T5 engine makes them (`_weighted_t5`)."""
        plains = [_plain(t) for t in texts]
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=plains,
            prompt_2=plains,
            device=pipe._execution_device,
            max_sequence_length=self.spec.t5_tokens,
        )
        weighted = {i: parse_prompt_attention(t) for i, t in enumerate(texts)}
        weighted = {i: p for i, p in weighted.items() if any(w not in (1.0, -1) for _, w in p)}
        if weighted:
            embeds = embeds.clone()
            for i, parsed in weighted.items():
                embeds[i] = self._weighted_t5(pipe, parsed).to(embeds.dtype)
        return embeds, pooled

    def _weighted_t5(self, pipe: Any, parsed: list[tuple[str, float]]) -> Any:
        """Forge's T5TextProcessingEngine with its "Original" emphasis (backend/
        text_processing/t5_engine.py, emphasis.py): each piece tokenized on its own with
        its weight, EOS, padded to the model's T5 length (cut there, as diffusers does);
        the states scaled by each token's weight and then by old mean / new mean."""
        import torch

        tokenizer = pipe.tokenizer_2
        pieces = [(p, w) for p, w in parsed if w != -1]
        ids_of = tokenizer([p for p, _ in pieces], add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        weights: list[float] = []
        for piece_ids, (_, weight) in zip(ids_of, pieces):
            ids += piece_ids
            weights += [weight] * len(piece_ids)
        limit = self.spec.t5_tokens
        ids = ids[: limit - 1] + [tokenizer.eos_token_id]
        weights = weights[: limit - 1] + [1.0]
        ids += [tokenizer.pad_token_id] * (limit - len(ids))
        weights += [1.0] * (limit - len(weights))
        device = pipe._execution_device
        z = pipe.text_encoder_2(torch.tensor([ids], device=device), output_hidden_states=False)[0][
            0
        ]
        z = z.float()
        original = z.mean()
        z = z * torch.tensor(weights, device=device)[:, None]
        return z * (original / z.mean())


# BFL's layers that are one module each in diffusers (BFL name → ours), as diffusers'
# kohya and BFL converters map them; the norms' `scale` is the RMSNorm's weight.
_DOUBLE_LAYERS = (
    ("img_attn.proj", "attn.to_out.0"),
    ("img_mlp.0", "ff.net.0.proj"),
    ("img_mlp.2", "ff.net.2"),
    ("img_mod.lin", "norm1.linear"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("txt_mlp.0", "ff_context.net.0.proj"),
    ("txt_mlp.2", "ff_context.net.2"),
    ("txt_mod.lin", "norm1_context.linear"),
    ("img_attn.norm.query_norm", "attn.norm_q"),
    ("img_attn.norm.key_norm", "attn.norm_k"),
    ("txt_attn.norm.query_norm", "attn.norm_added_q"),
    ("txt_attn.norm.key_norm", "attn.norm_added_k"),
)
_SINGLE_LAYERS = (
    ("linear2", "proj_out"),
    ("modulation.lin", "norm.linear"),
    ("norm.query_norm", "attn.norm_q"),
    ("norm.key_norm", "attn.norm_k"),
)
_GLOBAL_LAYERS = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)
# The union ControlNets' control types (InstantX FLUX.1-dev-Controlnet-Union's model
# card: canny 0, tile 1, depth 2, blur 3, pose 4, gray 5, low quality 6) by our
# preprocessor names.
UNION_MODES = {"canny": 0, "tile_resample": 1, "depth": 2, "openpose": 4}
_IMAGE_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_TEXT_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_XLABS = ("", "diffusion_model.")  # XLabs' processor names, bare or under ComfyUI's prefix


def _kohya_names(spec: Any) -> bool:
    """A LoRA written under sd-scripts' names (`[training] flux_lora_layout`, "kohya" by
    default); LoHa/LoKr keep LyCORIS's either way."""
    return spec.method == "lora" and spec.flux_lora_layout == "kohya"


def kohya_layer_names(double_blocks: int, single_blocks: int) -> dict[str, tuple[str, ...]]:
    """sd-scripts' Flux.1 LoRA name of each Linear in the blocks (`lora_unet_` + BFL's
    layer with `_`, what lora_flux trains and diffusers' kohya converter maps) → the
    diffusers transformer modules it is, in its rows' order."""

    def kohya(bfl: str) -> str:
        return "lora_unet_" + bfl.replace(".", "_")

    names: dict[str, tuple[str, ...]] = {}
    for i in range(double_blocks):
        at, block = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        names[kohya(at + "img_attn.qkv")] = tuple(block + x for x in _IMAGE_QKV)
        names[kohya(at + "txt_attn.qkv")] = tuple(block + x for x in _TEXT_QKV)
        for theirs, ours in _DOUBLE_LAYERS:
            if not theirs.endswith("_norm"):
                names[kohya(at + theirs)] = (block + ours,)
    for i in range(single_blocks):
        at, block = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        names[kohya(at + "linear1")] = (*(block + x for x in _IMAGE_QKV), block + "proj_mlp")
        for theirs, ours in _SINGLE_LAYERS:
            if not theirs.endswith("_norm"):
                names[kohya(at + theirs)] = (block + ours,)
    return names


def _with_tokens(text: Any, tokens: Any, weight: float) -> Any:
    """T5's states of each row followed by the reference's tokens, times the weight."""
    import torch

    tokens = tokens.to(device=text.device, dtype=text.dtype).expand(text.shape[0], -1, -1)
    return torch.cat([text, tokens], dim=1) * weight


class _ScheduledForward:
    """The transformer's (or its ControlNet's) forward with each step's prompt rows
    (prompt editing and alternation). A step is a new timestep: true CFG's second call at
    the same timestep (the negative's, a tensor other than the positive one) passes
    through."""

    def __init__(self, forward: Any, positive: Any, embeds: Any, pooled: Any, rows: list) -> None:
        self.forward, self.positive = forward, positive
        self.embeds, self.pooled, self.rows = embeds, pooled, rows
        self.step, self.last = -1, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        timestep = kwargs.get("timestep")
        value = float(timestep.flatten()[0]) if timestep is not None else None
        if value != self.last:
            self.step, self.last = self.step + 1, value
        if kwargs.get("encoder_hidden_states") is self.positive:
            at = [text_at_step(r, self.step) for r in self.rows]  # type: ignore[arg-type]
            kwargs["encoder_hidden_states"] = self.embeds[at]
            kwargs["pooled_projections"] = self.pooled[at]
        return self.forward(*args, **kwargs)


class _Read:
    """A prompt as Flux reads it: its text (A1111 weights kept, BREAK left out, AND parts
    joined), the plain texts its schedule encodes, and what in it had no effect."""

    def __init__(self, text: str, texts: list[str], weights: bool, breaks: bool, ands: bool):
        self.text, self.texts = text, texts
        self.weights, self.breaks, self.ands = weights, breaks, ands


_BREAK = re.compile(r"\s*\bBREAK\b\s*")  # A1111's re_break


def _read(prompt: str) -> _Read:
    parts = split_and(prompt)
    ands = len(parts) > 1
    joined = ", ".join(text.strip() for text, _ in parts) if ands else prompt
    breaks = bool(_BREAK.search(joined))
    text = _BREAK.sub(" ", joined)
    scheduled = [t for _, t in plan_prompt(text, "", 1000).parts[0][1]]
    weights = any(w != 1.0 for t in scheduled for _, w in parse_prompt_attention(t))
    return _Read(text, [_plain(t) for t in scheduled], weights, breaks, ands)


def _plain(text: str) -> str:
    """The text without A1111's weight brackets (its own parser: escapes included)."""
    return "".join(piece for piece, weight in parse_prompt_attention(text) if weight != -1)


def _true_cfg(spec_class: Any, spec: Any) -> bool:
    return (
        "negative_prompt" in spec_class.options
        and bool(spec.negative_prompt.strip())
        and spec.cfg_scale > 1
    )


class _FluxSchnell(Flux):
    spec = VARIANTS["schnell"]


class _FluxKontext(Flux):
    spec = VARIANTS["kontext"]
    control_pipelines: dict[str, str] = {}
    pipelines = {
        "img2img": "FluxKontextPipeline",
        "edit": "FluxKontextPipeline",
        "txt2img": "FluxKontextPipeline",
    }

    @contextmanager
    def edit_inputs(self, images: list[Any], width: int, height: int) -> Iterator[dict[str, Any]]:
        yield {"image": images[0]}  # Kontext reads one image

    def call_inputs(self, spec: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        # Kontext edits the whole image at the prompt's word: no denoising strength.
        inputs = {k: v for k, v in inputs.items() if k != "strength"}
        return super().call_inputs(spec, inputs)


class _FluxFill(Flux):
    spec = VARIANTS["fill"]
    control_pipelines: dict[str, str] = {}
    pipelines = {"inpaint": "FluxFillPipeline", "txt2img": "FluxFillPipeline"}


class _FluxControl(Flux):
    spec = VARIANTS["control"]
    pipelines = {"img2img": "FluxControlPipeline", "txt2img": "FluxControlPipeline"}
    control_pipelines: dict[str, str] = {}

    def input_control(self, model: Any) -> str | None:
        """The configured `control_preprocessor`, else by BFL's names: FLUX.1-Depth-dev
        reads depth maps, FLUX.1-Canny-dev edges."""
        from pipeline.contract.control import canonical_preprocessor

        if model.control_preprocessor:
            return canonical_preprocessor(model.control_preprocessor)
        return "depth" if "depth" in model.source.lower() else "canny"

    def call_inputs(self, spec: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        # A new image from the map: no denoising strength.
        inputs = {k: v for k, v in inputs.items() if k != "strength"}
        return super().call_inputs(spec, inputs)


_VARIANT_FAMILIES: dict[str, Flux] = {
    "dev": Flux(),
    "schnell": _FluxSchnell(),
    "kontext": _FluxKontext(),
    "fill": _FluxFill(),
    "control": _FluxControl(),
}
