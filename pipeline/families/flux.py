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

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pipeline.contract.families.flux import VARIANTS
from pipeline.contract.families.flux import Flux as SPEC
from pipeline.contract.prompt_schedule import plan_prompt, split_and, text_at_step
from pipeline.contract.prompt_syntax import parse_prompt_attention, strip_loras
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
    kohya_base_model = "flux1"
    prompt_chunks = False  # CLIP 77 and T5 512 tokens, fixed lengths
    # kohya's sd-scripts name the transformer `lora_unet_` and CLIP-L `lora_te1_`.
    lora_prefixes = {
        "transformer": "lora_unet_",
        "text_encoder": "lora_te1_",
        "text_encoder_2": "lora_te2_",
    }

    def owns(self, pipe: Any) -> bool:
        name = type(pipe).__name__
        return name.startswith("Flux") and not name.startswith("Flux2") and super().owns(pipe)

    def for_source(self, source: str) -> Flux:
        return _VARIANT_FAMILIES[self.spec.for_source(source).variant]

    # -- loading ---------------------------------------------------------------------------

    def fused_lora_layers(self, pipe: Any) -> dict[str, list[tuple[str, int, int | None]]]:
        """BFL's (and kohya's) layer names → diffusers' modules, as diffusers'
        `_convert_kohya_flux_lora_to_diffusers` maps them, with the fused qkv and
        single-block linear1 split at this model's own widths (diffusers hard-codes the
        12B model's 3072/12288)."""
        config = self.denoiser(pipe).config
        inner = config.num_attention_heads * config.attention_head_dim
        t = "transformer."
        blocks = t + "transformer_blocks."
        fused: dict[str, list[tuple[str, int, int | None]]] = {}

        def split(name: str, targets: list[str], widths: list[int]) -> None:
            bounds, start = [], 0
            for target, width in zip(targets, widths):
                bounds.append((target, start, start + width))
                start += width
            fused[name] = bounds

        def rename(name: str, target: str) -> None:
            fused[name] = [(target, 0, None)]

        for i in range(config.num_layers):
            at, block = f"lora_unet_double_blocks_{i}_", f"{blocks}{i}."
            split(at + "img_attn_qkv", [f"{block}attn.to_{x}" for x in "qkv"], [inner] * 3)
            split(at + "txt_attn_qkv", [f"{block}attn.add_{x}_proj" for x in "qkv"], [inner] * 3)
            for theirs, ours in _DOUBLE_LAYERS:
                rename(at + theirs, block + ours)
        mlp = int(inner * 4.0)  # FluxSingleTransformerBlock's mlp_ratio
        for i in range(config.num_single_layers):
            at, block = f"lora_unet_single_blocks_{i}_", f"{t}single_transformer_blocks.{i}."
            targets = [f"{block}attn.to_{x}" for x in "qkv"] + [f"{block}proj_mlp"]
            split(at + "linear1", targets, [inner] * 3 + [mlp])
            rename(at + "linear2", block + "proj_out")
            rename(at + "modulation_lin", block + "norm.linear")
        # LyCORIS's own wrapper (SimpleTuner's Flux LoKr/LoHa files) names the
        # transformer's modules `lycoris_<diffusers path>`.
        for path, _ in self.denoiser(pipe).named_modules():
            if path:
                rename("lycoris_" + path.replace(".", "_"), t + path)
        return fused

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
        transformer = self.denoiser(pipe)
        own = transformer.__dict__.get("forward")
        positive = kwargs["prompt_embeds"]
        transformer.forward = _ScheduledForward(transformer.forward, positive, embeds, pooled, rows)
        try:
            with torch.inference_mode():
                yield kwargs
        finally:
            if own is None:
                del transformer.forward
            else:
                transformer.forward = own

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


# kohya's double-block layers that are one module each in diffusers (BFL name → ours).
_DOUBLE_LAYERS = (
    ("img_attn_proj", "attn.to_out.0"),
    ("img_mlp_0", "ff.net.0.proj"),
    ("img_mlp_2", "ff.net.2"),
    ("img_mod_lin", "norm1.linear"),
    ("txt_attn_proj", "attn.to_add_out"),
    ("txt_mlp_0", "ff_context.net.0.proj"),
    ("txt_mlp_2", "ff_context.net.2"),
    ("txt_mod_lin", "norm1_context.linear"),
)


class _ScheduledForward:
    """The transformer's forward with each step's prompt rows (prompt editing and
    alternation). A step is a new timestep: true CFG's second call at the same timestep
    (the negative's, a tensor other than the positive one) passes through."""

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
    pipelines = {"inpaint": "FluxFillPipeline", "txt2img": "FluxFillPipeline"}


_VARIANT_FAMILIES: dict[str, Flux] = {
    "dev": Flux(),
    "schnell": _FluxSchnell(),
    "kontext": _FluxKontext(),
    "fill": _FluxFill(),
}
