"""Per-server settings: `config.toml` gives the defaults; a server's overrides (SQLite,
`bot.store.guild`) win. Read on every command, so `/admin settings` takes effect at
once, and each server only ever sees its own.

Keys are dotted like the config file: ``safety.policy``, ``limits.max_steps``,
``defaults.steps``, ``models.allowed``, ``quotas.images_per_day``,
``edit.allow_nsfw_real_faces``…
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bot.errors import UserError
from pipeline.contract.config import Config, DefaultsConfig
from pipeline.contract.jobs import Limits
from pipeline.contract.safety import NUDENET_LABELS, POLICIES


@dataclass(frozen=True)
class ServerSettings:
    policy: str
    threshold: float
    labels: dict[str, float]
    negative_prompt: str
    blocked_ephemeral: bool
    limits: Limits
    defaults: DefaultsConfig
    allowed_models: tuple[str, ...]  # empty: every configured model
    quota: dict[str, int]  # every member's quota here (0 = unlimited)
    # /edit: post NSFW-flagged edits of a photo that showed a real face (off: never posted)
    allow_nsfw_real_faces: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ValueError("expected true or false")


def _unit(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError("expected a number from 0 to 1")
    return value


def _labels(text: str) -> dict[str, float]:
    table = {}
    for part in text.replace(",", " ").split():
        label, _, value = part.partition("=")
        label = label.strip().upper()
        if label not in NUDENET_LABELS:
            raise ValueError(f"unknown NudeNet label {label}")
        table[label] = _unit(value)
    return table


def _policy(text: str) -> str:
    if text not in POLICIES:
        raise ValueError(f"expected one of {', '.join(POLICIES)}")
    return text


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("expected 0 or more")
    return value


def _typed(kind: type) -> Any:
    if kind is bool:
        return _bool
    if kind is int:
        return _non_negative_int
    if kind is float:
        return float
    return str


def _field_parsers(cls: type, prefix: str) -> dict[str, Any]:
    hints = {"int": int, "float": float, "str": str, "bool": bool}
    return {
        f"{prefix}.{f.name}": _typed(hints.get(str(f.type), str)) for f in dataclasses.fields(cls)
    }


PARSERS: dict[str, Any] = {
    "safety.policy": _policy,
    "safety.threshold": _unit,
    "safety.labels": _labels,
    "safety.negative_prompt": str,
    "safety.blocked_ephemeral": _bool,
    **_field_parsers(Limits, "limits"),
    **_field_parsers(DefaultsConfig, "defaults"),
    "models.allowed": _names,
    "quotas.images_per_day": _non_negative_int,
    "quotas.gpu_seconds_per_day": _non_negative_int,
    "quotas.trainings_per_week": _non_negative_int,
    "edit.allow_nsfw_real_faces": _bool,
}


def parse_setting(config: Config, key: str, text: str) -> Any:
    """The stored value for ``/admin settings key value`` ("default": None, i.e. reset)."""
    if key not in PARSERS:
        raise UserError(f"unknown setting `{key}`; /admin settings lists them")
    if text.strip().lower() == "default":
        return None
    try:
        value = PARSERS[key](text.strip())
    except ValueError as exc:
        raise UserError(f"`{key}` cannot be {text!r}: {exc}") from None
    if key == "models.allowed":
        known = {m.name for m in config.models}
        unknown = [name for name in value if name not in known]
        if unknown:
            raise UserError(
                f"no model named {', '.join(unknown)}; configured: {', '.join(sorted(known))}"
            )
    return value


def effective(config: Config, overrides: dict[str, Any]) -> ServerSettings:
    """The config's defaults with the server's overrides applied (and checked)."""

    def get(key: str, default: Any) -> Any:
        return overrides.get(key, default)

    def section(obj: Any, prefix: str) -> Any:
        changes = {
            f.name: overrides[f"{prefix}.{f.name}"]
            for f in dataclasses.fields(obj)
            if f"{prefix}.{f.name}" in overrides
        }
        return dataclasses.replace(obj, **changes) if changes else obj

    safety, quotas = config.safety, config.quotas
    return ServerSettings(
        policy=get("safety.policy", safety.policy),
        threshold=get("safety.threshold", safety.threshold),
        labels={**safety.labels, **get("safety.labels", {})},
        negative_prompt=get("safety.negative_prompt", safety.negative_prompt),
        blocked_ephemeral=get("safety.blocked_ephemeral", safety.blocked_ephemeral),
        limits=within_config(config.limits, section(config.limits, "limits")),
        defaults=section(config.defaults, "defaults"),
        allowed_models=tuple(get("models.allowed", ())),
        quota={
            key: get(f"quotas.{key}", getattr(quotas, key))
            for key in ("images_per_day", "gpu_seconds_per_day", "trainings_per_week")
        },
        allow_nsfw_real_faces=get("edit.allow_nsfw_real_faces", config.edit.allow_nsfw_real_faces),
        overrides=dict(overrides),
    )


def within_config(ceiling: Limits, limits: Limits) -> Limits:
    """The server's limits, never looser than config.toml's: `/admin settings` refuses a
    looser value, but config.toml may have been tightened since one was set."""
    tighter = {
        f.name: (max if f.name.startswith("min_") else min)(
            getattr(ceiling, f.name), getattr(limits, f.name)
        )
        for f in dataclasses.fields(Limits)
    }
    return dataclasses.replace(limits, **tighter)


def describe(config: Config, settings: ServerSettings) -> str:
    """`/admin settings` without arguments: every key, its value, and where it comes from."""
    values = {
        "safety.policy": settings.policy,
        "safety.threshold": settings.threshold,
        "safety.labels": " ".join(f"{k}={v:g}" for k, v in sorted(settings.labels.items())) or "-",
        "safety.negative_prompt": settings.negative_prompt or "-",
        "safety.blocked_ephemeral": settings.blocked_ephemeral,
        "models.allowed": ", ".join(settings.allowed_models) or "all",
        **{f"quotas.{k}": v for k, v in settings.quota.items()},
        "edit.allow_nsfw_real_faces": settings.allow_nsfw_real_faces,
        **{
            f"limits.{f.name}": getattr(settings.limits, f.name) for f in dataclasses.fields(Limits)
        },
        **{
            f"defaults.{f.name}": getattr(settings.defaults, f.name)
            for f in dataclasses.fields(DefaultsConfig)
        },
    }
    lines = [
        f"`{key}` = {value}" + (" *(this server)*" if key in settings.overrides else "")
        for key, value in values.items()
    ]
    return "\n".join(lines)
