"""A1111 sampler names (`pipeline.contract.samplers`) → diffusers scheduler objects."""

from __future__ import annotations

from typing import Any

import diffusers

from pipeline.contract.samplers import SCHEDULES, SIGMA_FLAGS, resolve


def build_scheduler(base_config: dict[str, Any], sampler: str, schedule: str = "Automatic"):
    """A diffusers scheduler for this sampler, built from the model's scheduler config."""
    spec, schedule = resolve(sampler, schedule)
    cls = getattr(diffusers, spec.scheduler)
    config = {k: v for k, v in dict(base_config).items() if k not in SIGMA_FLAGS}
    options = dict(spec.options)
    if not spec.fixed_schedule:
        options.update(SCHEDULES[schedule])
    if spec.scheduler in ("DDIMScheduler", "PNDMScheduler") and schedule == "SGM Uniform":
        options["timestep_spacing"] = "trailing"
    if spec.name == "LCM" or spec.name == "TCD":
        options.setdefault("timestep_spacing", "trailing")
    return cls.from_config(config, **options)
