"""AUTOMATIC1111 sampler and schedule names → diffusers schedulers.

Names are the ones A1111 users type (and paste from infotext): "DPM++ 2M", and the
older one-word spellings such as "DPM++ 2M Karras" that carry the schedule in the
name. Schedulers are always built with `from_config(model's scheduler config, …)` so
the model's betas, prediction type and offsets carry over (that happens in the worker:
`pipeline.models.schedulers`). Torch-free: the bot uses the name lists for autocomplete
and validates names before queueing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any

from pipeline.contract.jobs import JobError


@dataclass(frozen=True)
class SchedulerChoice:
    """A sampler as the user names it: the diffusers scheduler it is and that scheduler's
    options. `Sampler` (UNet families) and `FlowSampler` (flow-matching families) add
    their own flags."""

    name: str
    scheduler: str  # diffusers class name
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sampler(SchedulerChoice):
    # Samplers whose schedule is part of their design ignore the schedule type.
    fixed_schedule: bool = False


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("Euler a", "EulerAncestralDiscreteScheduler"),
        Sampler("Euler", "EulerDiscreteScheduler"),
        Sampler("LMS", "LMSDiscreteScheduler"),
        Sampler("Heun", "HeunDiscreteScheduler"),
        Sampler("DPM2", "KDPM2DiscreteScheduler"),
        Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler"),
        Sampler(
            "DPM++ 2M",
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2},
        ),
        Sampler(
            "DPM++ 2M SDE",
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
        ),
        Sampler("DPM++ SDE", "DPMSolverSDEScheduler"),
        Sampler("DPM++ 2S a", "DPMSolverSinglestepScheduler", {"solver_order": 2}),
        Sampler("DDIM", "DDIMScheduler", fixed_schedule=True),
        Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, fixed_schedule=True),
        Sampler("UniPC", "UniPCMultistepScheduler"),
        Sampler("LCM", "LCMScheduler", fixed_schedule=True),
        Sampler("DEIS", "DEISMultistepScheduler"),
        Sampler("DDPM", "DDPMScheduler", fixed_schedule=True),
        Sampler("TCD", "TCDScheduler", fixed_schedule=True),
    )
}

# Schedule types (A1111 ≥ 1.9 "Schedule type") → scheduler config flags.
SCHEDULES: dict[str, dict[str, Any]] = {
    "Automatic": {},
    "Uniform": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "Beta": {"use_beta_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}

SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def sampler_names() -> list[str]:
    """Every accepted sampler name, including the "… Karras"-style spellings."""
    names = list(SAMPLERS)
    for name, sampler in SAMPLERS.items():
        if not sampler.fixed_schedule:
            names += [f"{name} {schedule}" for schedule in ("Karras", "Exponential")]
    return names


def resolve(sampler: str, schedule: str = "Automatic") -> tuple[Sampler, str]:
    """Split a sampler name into the sampler and its schedule type.

    "DPM++ 2M Karras" → (DPM++ 2M, "Karras"). An explicit schedule other than
    Automatic wins over the one in the name, as in A1111's UI.
    """
    lookup = {name.lower(): name for name in SAMPLERS}
    schedules = {name.lower(): name for name in SCHEDULES}
    if schedule.lower() not in schedules:
        raise JobError(f"unknown schedule type {schedule!r}; valid: {', '.join(SCHEDULES)}")
    schedule = schedules[schedule.lower()]
    key = " ".join(sampler.split()).lower()
    if key in lookup:
        return SAMPLERS[lookup[key]], schedule
    for suffix in ("karras", "exponential", "sgm uniform", "beta"):
        base = key.removesuffix(" " + suffix)
        if base != key and base in lookup and not SAMPLERS[lookup[base]].fixed_schedule:
            named = schedules[suffix]
            return SAMPLERS[lookup[base]], schedule if schedule != "Automatic" else named
    close = get_close_matches(sampler, sampler_names(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise JobError(
        f"unknown sampler {sampler!r}.{hint} Valid samplers: {', '.join(sampler_names())}"
    )
