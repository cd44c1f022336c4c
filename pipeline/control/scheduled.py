"""ControlNets under prompt editing and AND: each UNet row gets the residuals of its own text.

diffusers' ControlNet pipelines run the ControlNet once per step on the pipeline's
prompt embeddings and hand its residuals to the UNet. With prompt editing or AND, those
embeddings are only the step-0 texts (`pipeline.generate.conditioning` picks each
step's rows inside the UNet's forward), so the ControlNet would see `[a:b:0.5]`'s "a"
for the whole run and every AND part's residuals would come from the first part's text.
sd-webui-controlnet runs the ControlNet inside the UNet's forward instead, on each row's
own conditioning. So while the scheduled UNet is active, the pipeline's ControlNet call
only records its inputs (a `Deferred`, passed through the pipeline in place of the
residuals), and the scheduled UNet runs the ControlNet on the rows it evaluates, with
their texts (`Deferred.run`). Guess mode (shuffle-type ControlNets, whose residuals the
pipeline pads itself) runs as diffusers does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Deferred:
    """The inputs of one deferred ControlNet call (one denoising step)."""

    def __init__(self, net: Any, forward: Any, kwargs: dict[str, Any]) -> None:
        self.net = net
        self.forward = forward
        self.kwargs = kwargs

    def run(
        self, kwargs: dict[str, Any], embeds: Any, pooled: Any, negatives: list[bool]
    ) -> dict[str, Any]:
        """The residuals for UNet rows with text `embeds` (SDXL: `pooled`); `kwargs` are
        the recorded inputs re-indexed to those rows, `negatives` which rows are the
        unconditional half (the "ControlNet is more important" mode spares them)."""
        import torch

        if pooled is not None:
            kwargs["added_cond_kwargs"] = {
                **(kwargs.get("added_cond_kwargs") or {}),
                "text_embeds": pooled,
            }
        self.net.uncond_rows = torch.tensor(negatives, dtype=torch.bool)
        try:
            down, mid = self.forward(encoder_hidden_states=embeds, return_dict=False, **kwargs)
        finally:
            self.net.uncond_rows = None
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def deferred_of(kwargs: dict[str, Any]) -> Deferred | None:
    found = kwargs.get("mid_block_additional_residual")
    return found if isinstance(found, Deferred) else None


@contextmanager
def defer_controlnet(pipe: Any) -> Iterator[None]:
    """While active, `pipe.controlnet` (if any) records its calls instead of running."""
    net = getattr(pipe, "controlnet", None)
    if net is None:
        yield
        return
    forward = net.forward  # the bound method (or an earlier instance wrapper)
    own = net.__dict__.get("forward")

    def record(sample, timestep, encoder_hidden_states=None, *, guess_mode=False, **kwargs):
        if guess_mode:
            return forward(sample, timestep, encoder_hidden_states, guess_mode=True, **kwargs)
        kwargs.pop("return_dict", None)
        deferred = Deferred(net, forward, {"sample": sample, "timestep": timestep, **kwargs})
        return [deferred], deferred

    net.forward = record
    try:
        yield
    finally:
        if own is None:
            del net.forward
        else:
            net.forward = own
