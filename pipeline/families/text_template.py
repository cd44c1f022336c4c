"""What the worker halves of Z-Image, Qwen-Image and Flux.2 klein share: a transformer as
the denoiser (known by its class), one chat-template text encoder whose pipeline encodes
the prompt itself (`text_prompts`: the words of an A1111 prompt, with what had no effect
and where the text was cut said to the member), the model's own flow-matching Euler
scheduler (`scheduler`), and edit inputs (`edit_inputs`). Torch-free half:
`pipeline.contract.families.plain_text`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

from pipeline.contract.families.plain_text import plain_prompt
from pipeline.contract.jobs import GenerateSpec
from pipeline.families.base import Family


class TextTemplateFamily(Family):
    denoiser_name = "transformer"
    transformer_class: ClassVar[str] = ""  # what `owns` recognises a pipeline by

    def owns(self, pipe: Any) -> bool:
        denoiser = getattr(pipe, self.denoiser_name, None)
        return denoiser is not None and type(denoiser).__name__ == self.transformer_class

    def scheduler(self, base_config: dict[str, Any], sampler: str, schedule: str) -> Any:
        """The model's own FlowMatchEulerDiscreteScheduler ("Euler", the one name the
        family takes: `spec.samplers`), with its shift. Other flow samplers: issue 23."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(base_config)

    def text_prompts(self, pipe: Any, samples: Sequence[GenerateSpec]) -> dict[str, Any]:
        """The prompts as text for the pipeline's own chat-template encoding, one per
        sample; `notices` lists what the member wrote that had no effect."""
        prompts, negatives, notices = [], [], []
        for spec in samples:
            text, said = plain_prompt(self.label, spec.prompt)
            negative, said_too = plain_prompt(self.label, spec.negative_prompt)
            prompts.append(text)
            negatives.append(negative)
            notices += said + said_too + self._cut(pipe, text)
        inputs = {"prompt": prompts, **self.negative_inputs(negatives)}
        return {"inputs": inputs, "notices": list(dict.fromkeys(notices))}

    def negative_inputs(self, negatives: list[str]) -> dict[str, Any]:
        return {"negative_prompt": negatives}

    def _cut(self, pipe: Any, text: str) -> list[str]:
        limit = self.spec.max_prompt_tokens  # type: ignore[attr-defined]
        count = len(pipe.tokenizer(text, add_special_tokens=False)["input_ids"])
        if count <= limit:
            return []
        return [f"the prompt is {count} tokens; {self.label} reads the first {limit}, the rest was cut"]

    def guidance(self, cfg_scale: float) -> dict[str, Any]:
        return {"guidance_scale": cfg_scale}

    def input_size(self, width: int, height: int) -> dict[str, Any]:
        # Their img2img/inpaint pipelines default to 1024² rather than the input's size.
        return {"width": width, "height": height}

    @contextmanager
    def edit_inputs(self, images: list[Any], width: int, height: int) -> Iterator[dict[str, Any]]:
        yield {"image": images}
