"""What the commands share: the one-line error, and the config they run with."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.contract.config import Config, config_from_dict, load_config
from pipeline.contract.model_names import is_model_path, resolve_model

EXIT_USAGE = 2


class CliError(Exception):
    """A one-line message for the terminal; the command exits non-zero."""


def command_config(args: argparse.Namespace, *, model: str | None = None) -> Config:
    """The config file, or — for offline use with a model path and no config — a
    config holding just that model."""
    path = args.config or os.environ.get("SDBOT_CONFIG") or "config.toml"
    if Path(path).exists() or args.config:
        config = load_config(path)
    elif model and is_model_path(model):
        config = config_from_dict({"models": {Path(model).stem: {"source": str(model)}}})
    else:
        raise CliError(f"config file {path} not found; pass --config PATH or --model PATH")
    if model and is_model_path(model):
        config, _ = resolve_model(config, model)  # a model path joins the config
    return config
