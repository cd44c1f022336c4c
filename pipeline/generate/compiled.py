"""The compiled generation path (`[workers] compile = true`).

`prepare(model)` (once per loaded model, at worker start for the default model) puts
the UNet and the VAE decoder in channels_last, fuses the attention's QKV projections
(diffusers `fuse_qkv_projections`, SDPA kernels), and wraps both in `torch.compile`
(`max-autotune` on CUDA, inductor's default mode on the CPU, `dynamic=False`). `warm`
then runs one short generation at the default size and one image per job, so that
graph is compiled before the first member's job.

`active(model, pipe)` is the hook `pipeline.generate.modes._call` wraps every pipeline
call in. Inside it the pipeline's UNet and VAE decoder are the compiled ones and
torch runs under the stance "eager_on_recompile": a shape that was compiled (warmed)
runs compiled, any other (another size, batch, prompt length, timestep dtype) runs
eager instead of compiling for minutes in a member's job (see docs/DECISIONS.md).

With `slots` (`[loras] slots`, `pipeline.loras.slots`) every UNet Linear/Conv2d gets
its LoRA slot buffers before compiling, so jobs whose UNet LoRAs fit the slots run this
same compiled graph; QKV projections are then left unfused (the slots sit on
to_q/to_k/to_v; measured in BENCHMARKS.md, issue 13). A UNet that carries LoRAs
otherwise — a forward hook, a patched `forward`, or a peft layer with its adapters
enabled — runs eager, with the original attention processors, so LoRAs on
to_q/to_k/to_v are applied exactly as on the eager path.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

CUDA_MODE = "max-autotune"
CPU_MODE = "default"  # measured in bench/bench_speed.py; see BENCHMARKS.md
# torch.compile's backend. Tests and the GPU script's dry run that check dynamo's graphs
# and guards (not inductor's kernels) set "aot_eager": the same capture, no codegen.
BACKEND = "inductor"
# The stance pipeline calls run under: only `warm` compiles new graphs.
_STANCE = contextvars.ContextVar("sdbot_compile_stance", default="eager_on_recompile")


@dataclass
class Compiled:
    """One model's compiled modules and the attention processors to switch between."""

    denoiser: Any
    decoder: Any
    fused: dict[str, Any] | None
    original: dict[str, Any]
    warmed: set[tuple] = field(default_factory=set)
    compile_s: float = 0.0
    runs: int = 0  # pipeline calls that ran compiled


def prepare(model: Any, *, slots: int = 0, max_rank: int = 32, rows: int = 32) -> Compiled:
    """Compile the model's UNet and VAE decoder (lazily: the first call compiles); with
    `slots` > 0, first give the UNet LoRA slots (`pipeline.loras.slots.install`)."""
    found = getattr(model, "_compiled", None)
    if found is not None:
        return found
    pipe = model.pipe
    unet, vae = model.kind.denoiser(pipe), pipe.vae
    if slots > 0:
        from pipeline.loras import slots as lora_slots

        lora_slots.install(unet, slots=slots, max_rank=max_rank, rows=rows)
    unet.to(memory_format=torch.channels_last)
    vae.to(memory_format=torch.channels_last)
    original = dict(unet.attn_processors)
    fused = None
    if slots > 0:  # a fused to_qkv would bypass the slots on to_q/to_k/to_v
        log.info("QKV projections not fused: the UNet has LoRA slots")
    else:
        try:
            unet.fuse_qkv_projections()
            fused = dict(unet.attn_processors)
            unet.set_attn_processor(dict(original))  # it pops from the dict it is given
        except ValueError as exc:  # added-KV attention (not in SD 1.x / SDXL): unfused
            log.info("QKV projections not fused: %s", exc)
    mode = CUDA_MODE if str(model.device).startswith("cuda") else CPU_MODE
    options: dict[str, Any] = {"dynamic": False, "backend": BACKEND}
    if mode != "default" and BACKEND == "inductor":
        options["mode"] = mode
    compiled = Compiled(
        denoiser=torch.compile(unet, **options),
        decoder=torch.compile(vae.decoder, **options),
        fused=fused,
        original=original,
    )
    model._compiled = compiled
    return compiled


def warm(model: Any, defaults: Any = None, *, steps: int = 2, **slots: int) -> float:
    """Compile the graphs for one image at the default size, sampler and CFG (those of
    `defaults`, a DefaultsConfig); returns the seconds it took. `slots`: see prepare."""
    from pipeline.contract.jobs import GenerateSpec
    from pipeline.generate.modes import run_generation

    compiled = prepare(model, **slots)
    values: dict[str, Any] = {}
    if defaults is not None:
        keys = ("sampler", "schedule", "cfg_scale", "width", "height", "negative_prompt")
        values = {key: getattr(defaults, key) for key in keys}
    spec = GenerateSpec(prompt="warm-up", steps=steps, seed=0, **values)
    start = time.perf_counter()
    with compiling():
        run_generation(model, [spec], preview_every=0)
    compiled.compile_s = time.perf_counter() - start
    compiled.warmed.add((spec.width, spec.height, 1))
    log.info(
        "compiled %s at %dx%d in %.1f s", model.name, spec.width, spec.height, compiled.compile_s
    )
    return compiled.compile_s


@contextmanager
def no_recompiling() -> Iterator[None]:
    """Pipeline calls within raise instead of recompiling a warmed function (a guard that
    fails, e.g. on a LoRA switch): how tests prove the slots keep the graph."""
    token = _STANCE.set("fail_on_recompile")
    try:
        yield
    finally:
        _STANCE.reset(token)


@contextmanager
def compiling() -> Iterator[None]:
    """Pipeline calls within may compile graphs for new shapes (warm-ups, benchmarks)."""
    token = _STANCE.set("default")
    try:
        yield
    finally:
        _STANCE.reset(token)


def carries_loras(unet: torch.nn.Module) -> bool:
    """Whether any layer of the UNet is hooked, patched or has peft adapters enabled."""
    for module in unet.modules():
        if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
            return True
        peft = hasattr(module, "disable_adapters") and hasattr(module, "active_adapters")
        if peft and not module.disable_adapters and module.active_adapters:
            return True
    return False


@contextmanager
def active(model: Any, pipe: Any) -> Iterator[bool]:
    """Within the context the pipe runs the compiled UNet and decoder; yields whether it
    does (False: compile off, or LoRAs on the UNet)."""
    compiled = getattr(model, "_compiled", None)
    family = model.kind
    if compiled is None or carries_loras(family.denoiser(pipe)):
        yield False
        return
    unet, vae = family.denoiser(pipe), pipe.vae
    decoder = vae.decoder
    if compiled.fused is not None:
        unet.set_attn_processor(dict(compiled.fused))
    family.swap_denoiser(pipe, compiled.denoiser)
    vae.decoder = compiled.decoder
    compiled.runs += 1
    try:
        with torch.compiler.set_stance(_STANCE.get()):
            yield True
    finally:
        vae.decoder = decoder
        family.swap_denoiser(pipe, unet)
        if compiled.fused is not None:
            unet.set_attn_processor(dict(compiled.original))
