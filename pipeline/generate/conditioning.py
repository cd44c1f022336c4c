"""Prompt editing, alternation and AND in the denoising loop, as AUTOMATIC1111 runs them.

`prompt_conditioning` is what a mode passes to the diffusers pipeline. For plain
prompts (every sample: one part at weight 1, no text changing over the steps) it is
`encode_prompts`' embeddings and nothing else changes. Otherwise:

1. Each sample's plan (`pipeline.contract.prompt_schedule.plan_prompt`) is made for the
   number of denoising evaluations the sampler will run (A1111 counts evaluations too:
   a second-order sampler's schedule spans 2·steps−1).
2. Every distinct text of the batch is encoded once, in one text-encoder call, padded
   to the batch's chunk count (one text per sample and slot when the samples have their
   own LoRAs, which need each sample's rows together).
3. The UNet's forward is wrapped for the call: at evaluation k (from 0, as A1111's
   denoiser counts) each sample's negative and parts take the text their schedule has
   for k, the UNet runs once over all those rows (SDXL: with each text's pooled
   embedding), and each sample's "text" prediction handed back to the pipeline is
   u + Σ wᵢ(cᵢ − u). The pipeline's own CFG step then gives A1111's composable result
   u + cfg · Σ wᵢ(cᵢ − u). A plain sample in such a batch gets its own prediction back.

Anything else the pipeline passes with one row per batch row (SDXL time ids, IP-Adapter
image embeds) is re-indexed to each UNet row's sample. A ControlNet runs inside the
wrapped forward on each UNet row's own text, as sd-webui-controlnet runs it
(`pipeline.control.scheduled`).

With per-sample LoRAs the UNet rows must keep the batch layout the LoRA hooks expect
(row r belongs to sample r mod n, n or 2n rows): the rows are then run in as many such
calls as the sample with the most parts needs, unused slots repeating a row of the
same sample.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.contract.jobs import GenerateSpec, JobError
from pipeline.contract.prompt_schedule import PromptPlan, plan_prompt, text_at_step
from pipeline.contract.prompt_syntax import extract_loras
from pipeline.control.scheduled import defer_controlnet, deferred_of


def denoising_evaluations(scheduler: Any, steps: int, strength: float | None = None) -> int:
    """UNet evaluations a diffusers pipeline runs for `steps` (img2img: at `strength`)."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps, device="cpu")
    timesteps = scheduler.timesteps
    if strength is not None:  # diffusers' get_timesteps
        start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[start * scheduler.order :]
    return max(len(timesteps), 1)


def plan_for(spec: GenerateSpec, evaluations: int) -> PromptPlan:
    return plan_prompt(
        extract_loras(spec.prompt)[0], extract_loras(spec.negative_prompt)[0], evaluations
    )


def plan_chunk_count(pipe: Any, spec: GenerateSpec, evaluations: int) -> int:
    """75-token chunks the job's embeddings are padded to: its longest text at any step.
    Jobs batched together must have equal counts for each image to equal its solo run."""
    from pipeline.prompts.encoding import tokenize_chunks

    texts = plan_for(spec, evaluations).texts()
    return max(len(tokenize_chunks(pipe.tokenizer, text)) for text in texts)


@dataclass
class _Sample:
    """Rows of the encoded table a sample uses: (last step, row) schedules."""

    negative: list[tuple[int, int]]
    parts: list[tuple[float, list[tuple[int, int]]]]
    plain: bool


@dataclass
class _Encoded:
    embeds: torch.Tensor  # [rows, tokens, dim]
    pooled: torch.Tensor | None  # SDXL: [rows, dim]
    samples: list[_Sample]


@contextmanager
def prompt_conditioning(
    pipe: Any, samples: Sequence[GenerateSpec], evaluations: int
) -> Iterator[dict[str, Any]]:
    """Keyword arguments for `pipe(...)`; the UNet is wrapped while the block runs when
    any sample's prompt changes over the steps or has AND parts or a weight."""
    from pipeline.prompts.encoding import encode_prompts

    plans = [plan_for(spec, evaluations) for spec in samples]
    if all(plan.plain for plan in plans):
        prompts = [plan.parts[0][1][0][1] for plan in plans]
        yield encode_prompts(pipe, prompts, [plan.negative[0][1] for plan in plans])
        return
    per_sample = any(spec.loras != samples[0].loras for spec in samples)
    encoded = _encode(pipe, plans, per_sample=per_sample)
    from pipeline.families import of_pipe

    unet = of_pipe(pipe).denoiser(pipe)
    own = unet.__dict__.get("forward")
    unet.forward = _ScheduledForward(unet.forward, encoded, paired=per_sample)
    try:
        # A ControlNet runs inside the scheduled UNet, on each row's own text.
        with defer_controlnet(pipe):
            yield _first_step_kwargs(encoded)
    finally:
        if own is None:
            del unet.forward
        else:
            unet.forward = own


def _encode(pipe: Any, plans: list[PromptPlan], *, per_sample: bool) -> _Encoded:
    from pipeline.prompts.encoding import encode_texts, tokenize_chunks

    slots = [plan.texts() for plan in plans]
    if per_sample:  # each sample its own texts, the same number each, sample by sample
        width = max(len(texts) for texts in slots)
        table = [text for texts in slots for text in texts + [""] * (width - len(texts))]
        offsets = [i * width for i in range(len(plans))]
        index = [{text: offsets[i] + j for j, text in enumerate(t)} for i, t in enumerate(slots)]
    else:  # one row per distinct text of the batch
        table = list(dict.fromkeys(text for texts in slots for text in texts))
        shared = {text: j for j, text in enumerate(table)}
        index = [shared] * len(plans)
    chunks = max(len(tokenize_chunks(pipe.tokenizer, text)) for text in table)
    embeds, pooled = encode_texts(pipe, table, chunks)
    zero_row = None
    if pooled is not None and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        # SDXL models ask for zeros instead of an encoded empty negative (as encode_prompts).
        zero_row = embeds.shape[0]
        embeds = torch.cat([embeds, torch.zeros_like(embeds[:1])])
        pooled = torch.cat([pooled, torch.zeros_like(pooled[:1])])
    samples = []
    for plan, rows in zip(plans, index):
        negative = [
            (last, zero_row if text == "" and zero_row is not None else rows[text])
            for last, text in plan.negative
        ]
        parts = [(w, [(last, rows[text]) for last, text in sched]) for w, sched in plan.parts]
        samples.append(_Sample(negative, parts, plan.plain))
    return _Encoded(embeds, pooled, samples)


def _row_at(schedule: list[tuple[int, int]], step: int) -> int:
    return text_at_step(schedule, step)  # type: ignore[arg-type]


def _first_step_kwargs(encoded: _Encoded) -> dict[str, Any]:
    """What the pipeline is given: the step-0 texts (it needs shapes, and SDXL's pooled
    embedding for its time ids); the wrapped UNet picks each step's rows itself."""
    positive = [_row_at(s.parts[0][1], 0) for s in encoded.samples]
    negative = [_row_at(s.negative, 0) for s in encoded.samples]
    kwargs = {
        "prompt_embeds": encoded.embeds[positive],
        "negative_prompt_embeds": encoded.embeds[negative],
    }
    if encoded.pooled is not None:
        kwargs["pooled_prompt_embeds"] = encoded.pooled[positive]
        kwargs["negative_pooled_prompt_embeds"] = encoded.pooled[negative]
    return kwargs


class _ScheduledForward:
    """UNet forward that picks each sample's rows for the step and combines AND parts."""

    def __init__(self, forward: Any, encoded: _Encoded, *, paired: bool) -> None:
        self.forward = forward
        self.encoded = encoded
        self.paired = paired
        self.step = 0

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor | None = None,
        *,
        added_cond_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        if kwargs.get("timestep_cond") is not None:
            raise JobError("prompt editing and AND need a model with classifier-free guidance")
        encoded, step = self.encoded, self.step
        self.step += 1
        n = len(encoded.samples)
        halves = sample.shape[0] // n  # 2 with classifier-free guidance
        latents = sample[-n:]
        if torch.is_tensor(timestep) and timestep.ndim == 1 and timestep.numel() > 1:
            timestep = timestep[0]
        # Per sample: [negative?] + parts, as (table row, is the negative).
        wanted = []
        for s in encoded.samples:
            rows = [(_row_at(sched, step), False) for _, sched in s.parts]
            if halves == 2 or not s.plain:
                rows.insert(0, (_row_at(s.negative, step), True))
            wanted.append(rows)
        calls = self._layout(wanted, halves)
        results: dict[tuple[int, int], torch.Tensor] = {}
        for layout in calls:
            out = self._run(
                layout, wanted, latents, timestep, added_cond_kwargs, kwargs, sample.shape[0]
            )
            for (i, j, real), row in zip(layout, out):
                if real:
                    results[i, j] = row
        uncond, text = [], []
        for i, s in enumerate(encoded.samples):
            first_part = 1 if wanted[i][0][1] else 0
            parts = [results[i, j] for j in range(first_part, len(wanted[i]))]
            u = results[i, 0] if first_part else None
            if s.plain:
                text.append(parts[0])
            else:
                combined = u.clone()
                for (weight, _), c in zip(s.parts, parts):
                    combined += weight * (c - u)
                text.append(combined)
            if halves == 2:
                uncond.append(u)
        noise = torch.stack(uncond + text)
        if not return_dict:
            return (noise,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=noise)

    def _layout(self, wanted: list[list[tuple[int, bool]]], halves: int) -> list[list[tuple]]:
        """UNet calls as lists of (sample, slot, real): one call with every row, or with
        per-sample LoRAs calls of `halves`·n rows where row r belongs to sample r mod n."""
        if not self.paired:
            return [[(i, j, True) for i, rows in enumerate(wanted) for j in range(len(rows))]]
        n = len(wanted)
        calls = math.ceil(max(len(rows) for rows in wanted) / halves)
        out = []
        for q in range(calls):
            layout = []
            for r in range(halves * n):
                i, j = r % n, q * halves + r // n
                layout.append((i, j, True) if j < len(wanted[i]) else (i, 0, False))
            out.append(layout)
        return out

    def _run(self, layout, wanted, latents, timestep, added, kwargs, total) -> torch.Tensor:
        encoded = self.encoded
        n = len(wanted)
        samples = [i for i, _, _ in layout]
        rows = [wanted[i][j][0] for i, j, _ in layout]
        # Each row's own row of whatever else the pipeline passes per row (SDXL time ids,
        # ControlNet residuals, IP-Adapter image embeds): with CFG the negatives' half
        # first, the positives' last; a part takes its sample's positive row.
        source = [i if wanted[i][j][1] and total == 2 * n else total - n + i for i, j, _ in layout]
        added = _rows_of(added, source, total)
        pooled = encoded.pooled[rows] if encoded.pooled is not None else None
        if pooled is not None:
            added = {**(added or {}), "text_embeds": pooled}
        extra = _rows_of(kwargs, source, total)
        if (deferred := deferred_of(kwargs)) is not None:  # the ControlNet, on these rows
            negatives = [wanted[i][j][1] for i, j, _ in layout]
            recorded = _rows_of(deferred.kwargs, source, total)
            extra.update(deferred.run(recorded, encoded.embeds[rows], pooled, negatives))
        return self.forward(
            latents[samples],
            timestep,
            encoder_hidden_states=encoded.embeds[rows],
            added_cond_kwargs=added,
            return_dict=False,
            **extra,
        )[0]


def _rows_of(value: Any, index: list[int], total: int) -> Any:
    """`value` with every tensor that has one row per batch row re-indexed."""
    if torch.is_tensor(value):
        return value[index] if value.ndim and value.shape[0] == total else value
    if isinstance(value, (list, tuple)):
        return type(value)(_rows_of(v, index, total) for v in value)
    if isinstance(value, dict):
        return {k: _rows_of(v, index, total) for k, v in value.items()}
    return value
