"""Which device a worker uses and in which dtype: pure functions, no torch import.

The policy is a function of what the device is (kind, compute capability) and what the
config asks for, so it is tested without a GPU; `pipeline.models.loading` asks torch
for the capability of the worker's own `cuda:N` and calls `dtype_for`. The bot side
checks the configured devices against the GPUs nvidia-smi lists (`check_devices`)
before a worker starts or a job is claimed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

DTYPES = ("auto", "float16", "bfloat16", "float32")
# bf16 needs Ampere (8.0) or newer in hardware; older cards emulate it, slowly.
BF16_MIN_CAPABILITY = (8, 0)
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class DeviceError(ValueError):
    """A configured device or dtype this machine cannot use; one line for the admin."""


def dtype_for(kind: str, capability: tuple[int, int] | None, configured: str = "auto") -> str:
    """The dtype name a worker on this device uses.

    kind: "cuda", "cpu" or "mps"; capability: the CUDA compute capability (None off
    CUDA). An explicit dtype is used as configured; "auto" gives bf16 on GPUs with
    native bf16 (capability ≥ 8.0: A100, RTX 30xx/40xx, H100), fp16 on older GPUs
    (T4, V100: bf16 would be emulated) and fp32 on the CPU (half precision there is
    slower and only for tests).
    """
    if configured not in DTYPES:
        raise DeviceError(bad_dtype_message(configured))
    if configured != "auto":
        return configured
    if kind == "cuda":
        native_bf16 = capability is not None and tuple(capability) >= BF16_MIN_CAPABILITY
        return "bfloat16" if native_bf16 else "float16"
    return "float32"


def dtype_warning(kind: str, capability: tuple[int, int] | None, dtype: str) -> str:
    """Why a configured dtype is a poor choice on this device, or "" when it is fine."""
    if kind == "cuda" and dtype == "bfloat16" and dtype_for(kind, capability) != "bfloat16":
        cc = ".".join(map(str, capability or ()))
        return f"bfloat16 is emulated on compute capability {cc} (< 8.0); float16 is faster"
    if kind == "cpu" and dtype in ("float16", "bfloat16"):
        return f"{dtype} on the CPU is slower than float32 (meant for tests)"
    return ""


def bad_dtype_message(value: object) -> str:
    return f"workers.dtype = {value!r} is not supported; use one of {', '.join(DTYPES)}"


def device_syntax_error(device: str) -> str:
    """ "" for a well-formed device name, else the one-line message."""
    if _DEVICE.match(device):
        return ""
    return (
        f"workers.devices: {device!r} is not a device; use auto, cpu, mps, cuda or cuda:N "
        "(N counts from 0)"
    )


def check_devices(devices: Sequence[str], gpu_count: int, *, how: str = "") -> None:
    """Raise DeviceError naming the first configured device this machine does not have.

    gpu_count: the GPUs a worker would see; how: where that count came from, for the
    message (e.g. "nvidia-smi lists 1").
    """
    for device in devices:
        if error := device_syntax_error(device):
            raise DeviceError(error)
        if not device.startswith("cuda"):
            continue
        index = int(device.partition(":")[2] or 0)
        if index < gpu_count:
            continue
        if gpu_count == 0:
            available = "this machine has no GPU a worker can use"
        else:
            names = ", ".join(f"cuda:{i}" for i in range(gpu_count))
            available = f"this machine has {gpu_count} GPU(s): {names}"
        detail = f" ({how})" if how else ""
        raise DeviceError(
            f"workers.devices: {device} does not exist; {available}{detail}. "
            "Use auto, cpu or one of those."
        )
