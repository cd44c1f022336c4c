"""What the worker halves of Z-Image, Qwen-Image and Flux.2 klein share, on the shared
flow pieces (`flow.FlowFamily`: samplers with the model's shift, the job's size, packed
previews, the flow objective): a transformer as the denoiser (known by its class), one
chat-template text encoder whose pipeline encodes the prompt itself
(`prompt_conditioning`: the words of an A1111 prompt; `prompt_notices`: what had no
effect and where the text was cut), and edit inputs (`edit_inputs`). Torch-free half:
`pipeline.contract.families.plain_text`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pipeline.contract.families.plain_text import plain_prompt
from pipeline.contract.jobs import GenerateSpec
from pipeline.families.flow import FlowFamily


class TextTemplateFamily(FlowFamily):
    # kohya / musubi-tuner name the transformer's modules `lora_unet_<path with _>`.
    lora_prefixes = {"transformer": "lora_unet_", "text_encoder": "lora_te_"}
    prompt_chunks = False  # the pipeline pads every prompt to its own length
    # diffusers loads these families' ControlNets from folders; a single file's layout
    # (alibaba-pai's, InstantX's) needs diffusers' converter and a config from the Hub.
    controlnet_single_files = False

    def owns(self, pipe: Any) -> bool:
        denoiser = getattr(pipe, self.denoiser_name, None)
        return denoiser is not None and type(denoiser).__name__ == self.transformer_class

    @contextmanager
    def prompt_conditioning(
        self, pipe: Any, samples: Sequence[GenerateSpec], steps: int, strength: float | None
    ) -> Iterator[dict[str, Any]]:
        """The prompts as text, one per sample, for the pipeline's own chat template."""
        texts = [plain_prompt(self.label, spec.prompt)[0] for spec in samples]
        negatives = [plain_prompt(self.label, spec.negative_prompt)[0] for spec in samples]
        yield {"prompt": texts, **self.negative_inputs(negatives)}

    def prompt_notices(self, pipe: Any, spec: GenerateSpec) -> tuple[str, ...]:
        """What the member wrote that had no effect, and where the text was cut."""
        text, said = plain_prompt(self.label, spec.prompt)
        said += plain_prompt(self.label, spec.negative_prompt)[1]
        return tuple(dict.fromkeys(said + self._cut(pipe, text)))

    def negative_inputs(self, negatives: list[str]) -> dict[str, Any]:
        return {"negative_prompt": negatives}

    def fused_lora_layers(self, pipe: Any) -> dict[str, list[tuple[str, int, int | None]]]:
        """The transformer's modules under the names LoRA files give them besides
        diffusers' (`transformer.<path>`) and kohya's: ai-toolkit's and ComfyUI's
        `diffusion_model.<path>` (which diffusers' converters strip) and LyCORIS's own
        wrapper's `lycoris_<path with _>`; plain renames, nothing fused."""
        renames: dict[str, list[tuple[str, int, int | None]]] = {}
        for path, _ in self.denoiser(pipe).named_modules():
            if path:
                ours = [(f"transformer.{path}", 0, None)]
                renames[f"diffusion_model.{path}"] = ours
                renames["lycoris_" + path.replace(".", "_")] = ours
        return renames

    def stack_controlnets(self, nets: list[Any]) -> Any:
        # One net per job (`TextTemplateSpec.max_control_units`): these pipelines take
        # it alone (Qwen-Image's multi-ControlNet runs a single union net too).
        return nets[0]

    def control_arguments(self, mode: str, images: list[Any], units: Sequence[Any]) -> dict:
        unit = units[0]
        return {
            "control_image": images[0],
            "controlnet_conditioning_scale": float(unit.weight),
            "control_guidance_start": float(unit.guidance_start),
            "control_guidance_end": float(unit.guidance_end),
        }

    def _cut(self, pipe: Any, text: str) -> list[str]:
        limit = self.spec.max_prompt_tokens  # type: ignore[attr-defined]
        count = len(pipe.tokenizer(text, add_special_tokens=False)["input_ids"])
        if count <= limit:
            return []
        return [
            f"the prompt is {count} tokens; {self.label} reads the first {limit}, the rest was cut"
        ]

    @contextmanager
    def edit_inputs(self, images: list[Any], width: int, height: int) -> Iterator[dict[str, Any]]:
        yield {"image": images}
