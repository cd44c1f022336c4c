"""What every flow-matching family shares, torch-free (Flux.1 here; Z-Image, Qwen-Image and
Flux.2 klein build on it): the sampler names it takes and the flow scheduler each
means, and the schedule types. Shared piece: a flow family's `FamilySpec` subclasses
`FlowSpec`; its worker half subclasses `pipeline.families.flow.FlowFamily`.

Samplers, as Forge offers them for Flux (its default: "Euler" with the "Simple"
schedule, which is the model's own shifted sigmas):

- "Euler": `FlowMatchEulerDiscreteScheduler` from the model's scheduler config, so its
  shift (fixed, or resolution-dependent with `use_dynamic_shifting`) is the model's.
- "DPM++ 2M", "UniPC": the flow-sigma variants of `DPMSolverMultistepScheduler` and
  `UniPCMultistepScheduler` (`use_flow_sigmas`, `prediction_type="flow_prediction"`),
  the model's shift carried over (`flow_shift`, or `use_dynamic_shifting` with the same
  base/max shift so the pipeline's `mu` sets it per resolution).

Schedule types: "Automatic" and "Simple" are the model's sigmas; "Karras",
"Exponential" and "Beta" reshape them (Euler only, as diffusers' flow Euler has them).
"""

from __future__ import annotations

from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any, ClassVar

from pipeline.contract.families.base import FamilySpec
from pipeline.contract.jobs import JobError
from pipeline.contract.samplers import SchedulerChoice


@dataclass(frozen=True)
class FlowSampler(SchedulerChoice):
    # Whether it reshapes sigmas by schedule type (FlowMatchEuler does; the solvers'
    # flow sigmas are their own).
    schedules: bool = False
    # Only the text-to-image pipeline leaves a flow solver's sigmas to it (diffusers'
    # img2img/inpaint/edit pipelines pass their own sigmas, which DPM-Solver refuses).
    txt2img_only: bool = False


_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}

FLOW_SAMPLERS: dict[str, FlowSampler] = {
    s.name: s
    for s in (
        FlowSampler("Euler", "FlowMatchEulerDiscreteScheduler", schedules=True),
        FlowSampler(
            "DPM++ 2M",
            "DPMSolverMultistepScheduler",
            {**_FLOW, "algorithm_type": "dpmsolver++", "solver_order": 2},
            txt2img_only=True,
        ),
        FlowSampler("UniPC", "UniPCMultistepScheduler", dict(_FLOW)),
    )
}

FLOW_SCHEDULES: dict[str, dict[str, Any]] = {
    "Automatic": {},
    "Simple": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "Beta": {"use_beta_sigmas": True},
}


def resolve_flow(sampler: str, schedule: str = "Automatic") -> tuple[FlowSampler, str]:
    """A flow sampler and its schedule type from what a member typed ("Euler",
    "Euler Karras", "DPM++ 2M"), or a JobError listing the names a flow model takes."""
    schedules = {name.lower(): name for name in FLOW_SCHEDULES}
    if schedule.lower() not in schedules:
        raise JobError(
            f"unknown schedule type {schedule!r} for a flow model; "
            f"valid: {', '.join(FLOW_SCHEDULES)}"
        )
    schedule = schedules[schedule.lower()]
    lookup = {name.lower(): name for name in FLOW_SAMPLERS}
    key = " ".join(sampler.split()).lower()
    for suffix in ("", *(f" {s.lower()}" for s in FLOW_SCHEDULES)):
        base = key.removesuffix(suffix) if suffix else key
        if base in lookup and (not suffix or base != key):
            found = FLOW_SAMPLERS[lookup[base]]
            named = schedules[suffix.strip()] if suffix else "Automatic"
            chosen = schedule if schedule != "Automatic" else named
            if chosen not in ("Automatic", "Simple") and not found.schedules:
                raise JobError(
                    f"the sampler {found.name!r} has no schedule types on flow models; "
                    "use Euler for Karras, Exponential or Beta"
                )
            return found, chosen
    raise JobError(f"unknown sampler {sampler!r}")


class FlowSpec(FamilySpec):
    """A flow-matching family, torch-free: its samplers are `FLOW_SAMPLERS`."""

    samplers = tuple(FLOW_SAMPLERS)
    schedules: ClassVar[tuple[str, ...]] = tuple(FLOW_SCHEDULES)
    default_sampler = "Euler"
    default_schedule = "Simple"

    @classmethod
    def sampler_names(cls) -> list[str]:
        """ "Euler", its schedule types ("Euler Karras"…), "DPM++ 2M", "UniPC"."""
        names = []
        for name in cls.samplers:
            names.append(name)
            if FLOW_SAMPLERS[name].schedules:
                names += [f"{name} {s}" for s in cls.schedules if s != "Automatic"]
        return names

    @classmethod
    def resolve_sampler(cls, sampler: str, schedule: str = "Automatic") -> tuple[str, str]:
        try:
            found, chosen = resolve_flow(sampler, schedule)
        except JobError as exc:
            if "unknown sampler" not in str(exc):
                raise
            close = get_close_matches(sampler, list(FLOW_SAMPLERS), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise JobError(
                f"{cls.label} models cannot use the sampler {sampler!r}{hint}; "
                f"they take: {', '.join(cls.samplers)}"
            ) from None
        return found.name, chosen
