"""Apply a memory plan (`pipeline.contract.memory_plan`) to a loaded pipeline.

The plan says how each component is held; this module does it with diffusers' own
tools: layerwise casting (fp8 storage, compute in the pipeline's dtype), model CPU
offload, group offload by blocks (CUDA streams on a GPU), sequential CPU offload, and
accelerate hooks for text encoders that are moved in to encode or run on the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from pipeline.contract.config import Config, ModelConfig
from pipeline.contract.memory_plan import (
    Card,
    MemoryPlan,
    ModelError,
    gpu_card,
    plan_for,
    ram_card,
)

log = logging.getLogger(__name__)

DENOISERS = ("transformer", "unet")


def worker_card(device: str, dtype: Any) -> Card:
    """The card of a worker on `device` (CUDA: its own free memory now; CPU: RAM)."""
    import torch

    compute = {torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, "bf16")
    if not device.startswith("cuda"):
        return dataclasses.replace(ram_card(), compute_dtype=compute)
    index = torch.device(device)
    free, total = torch.cuda.mem_get_info(index)
    name = torch.cuda.get_device_properties(index).name
    return gpu_card(name, total, free, compute, host_ram=ram_card().free)


def planned(config: Config, model: ModelConfig, device: str):
    """(the model config with the plan's VAE tiling threshold, the plan), or the model
    unchanged and None when its files cannot be read here (a Hub id not downloaded).
    Raises MemoryPlanError when no plan fits."""
    from pipeline.models.loading import choose_device, choose_dtype

    device = choose_device(device)
    card = worker_card(device, choose_dtype(device, config.workers.dtype))
    try:
        plan = plan_for(config, model, card)
    except (ModelError, MemoryError):
        # Unreadable here, or no memory even to read headers: load as before (and let the
        # loading report its own out-of-memory line).
        return model, None
    return dataclasses.replace(model, vae_tiling_above=plan.vae_tiling_above), plan


def apply_plan(pipe: Any, plan: MemoryPlan, device: str) -> None:
    """Hold the pipeline's components as the plan says, on `device`."""
    import torch

    denoiser = next(getattr(pipe, n) for n in DENOISERS if getattr(pipe, n, None) is not None)
    if "fp8" in plan.mode:
        compute = next(p.dtype for p in denoiser.parameters())
        denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
        _own_storage(denoiser)
    target = torch.device(device)
    if plan.mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=target)
    elif plan.mode in ("offload", "fp8-offload"):
        pipe.enable_model_cpu_offload(device=target)
    elif plan.mode == "group":
        denoiser.enable_group_offload(
            onload_device=target,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=target.type == "cuda",
        )
        _to_device(pipe, target, skip=(*DENOISERS, *_text_encoder_names(pipe)))
    else:
        _to_device(pipe, target, skip=_text_encoder_names(pipe))
    _place_text_encoders(pipe, plan, target, denoiser)
    log.info("memory plan: %s", plan.reason)


def _own_storage(module: Any) -> None:
    """Copy the tensors left in the compute dtype out of the weights file's memory map:
    while one view of the map lives, the whole file stays mapped, and every page the fp8
    cast read stays in the worker's RSS (3.4 GB for SD 1.5's UNet beside its 0.9 GB in fp8)."""
    import torch

    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "cpu" and tensor.dtype != torch.float8_e4m3fn:
            tensor.data = tensor.data.clone()


def _text_encoder_names(pipe: Any) -> tuple[str, ...]:
    from pipeline.families import of_pipe

    names = of_pipe(pipe).text_encoder_names
    return tuple(n for n in names if getattr(pipe, n, None) is not None)


def _to_device(pipe: Any, target: Any, skip: tuple[str, ...]) -> None:
    for name, module in pipe.components.items():
        if name not in skip and hasattr(module, "to") and hasattr(module, "parameters"):
            module.to(target)


def _place_text_encoders(pipe: Any, plan: MemoryPlan, target: Any, denoiser: Any) -> None:
    """device: resident; offload (with a resident denoiser): moved in on their forward and
    back to the CPU when the denoiser starts; cpu: they run on the CPU, their outputs
    moved to the device."""
    import torch
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    names = _text_encoder_names(pipe)
    if plan.text_encoders == "device":
        for name in names:
            getattr(pipe, name).to(target)
    elif plan.text_encoders == "cpu":
        for name in names:
            encoder = getattr(pipe, name)
            remove_hook_from_module(encoder, recurse=True)
            encoder.to("cpu")
            add_hook_to_module(encoder, AlignDevicesHook(torch.device("cpu"), io_same_device=True))
    elif plan.text_encoders == "offload" and plan.mode in ("full", "fp8", "group"):
        from accelerate import cpu_offload_with_hook

        hooks = [cpu_offload_with_hook(getattr(pipe, n), target)[1] for n in names]
        # Back to the CPU as soon as the denoiser runs: encoding is over by then.
        denoiser.register_forward_pre_hook(lambda *_: [h.offload() for h in hooks] and None)


# -- measured peaks (/admin stats, /metrics) ----------------------------------------------

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"


def peak_measure(device: str) -> str:
    """What `read_peak` measures on `device`: "gpu" (allocated tensors) or "rss"."""
    return "gpu" if str(device).startswith("cuda") else "rss"


def reset_peak(device: str) -> None:
    """Start measuring a new peak: CUDA's peak allocation statistics, or on the CPU the
    process's peak RSS (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    if peak_measure(device) == "gpu":
        import torch

        torch.cuda.reset_peak_memory_stats(torch.device(device))
        return
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak since the process started is read instead


def read_peak(device: str) -> int:
    """Bytes at the peak since `reset_peak`: `torch.cuda.max_memory_allocated` on a GPU,
    the process's peak RSS (VmHWM; ru_maxrss where /proc is missing) on the CPU."""
    if peak_measure(device) == "gpu":
        import torch

        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    try:
        with open(STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
