"""Which model a command means: the one resolution for every place a model is named.

A model is named by "default" (the first configured), a configured name, or a path —
a diffusers folder or a single-file checkpoint (.safetensors/.ckpt). A path that is
not configured yet joins the config, in front (so it is also the default), named
after its file or folder; a path that is configured is that entry. No torch here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.contract.config import Config, ModelConfig


def is_model_path(requested: str) -> bool:
    """True for an existing folder or file: a model given by its path, not a name."""
    return bool(requested) and Path(requested).exists()


def resolve_model(config: Config, requested: str) -> tuple[Config, ModelConfig]:
    """(the config that holds the model, the model). Raises ConfigError in one line
    naming the configured models when `requested` is neither a name nor a path."""
    if requested in ("", "default") or any(m.name == requested for m in config.models):
        return config, config.model(requested or "default")
    if not is_model_path(requested):
        config.model(requested)  # raises: unknown model …; configured models: …
    path = Path(requested).resolve()
    for model in config.models:
        if _same_path(model.source, path):
            return config, model
    model = ModelConfig(name=_free_name(config, path.stem), source=str(path))
    return dataclasses.replace(config, models=(model, *config.models)), model


def _same_path(source: str, path: Path) -> bool:
    try:
        return Path(source).exists() and Path(source).resolve() == path
    except OSError:
        return False


def _free_name(config: Config, stem: str) -> str:
    """The file's stem, unless a configured model (with another source) has that name."""
    taken = {m.name for m in config.models}
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}-{n}", n + 1
    return name
