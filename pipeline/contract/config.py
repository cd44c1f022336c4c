"""config.toml → typed settings. No torch import: the bot reads this too.

Every key has a default here, so a config file only needs what it changes; unknown
keys are an error (a typo should not silently do nothing). `config.toml` at the
repository root documents each key.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.contract.devices import DTYPES, bad_dtype_message, device_syntax_error
from pipeline.contract.jobs import Limits

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key and the file."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    source: str  # Hub id, local diffusers folder, or single-file .safetensors/.ckpt
    family: str = "auto"  # auto | sd1 | sdxl
    inpaint_source: str = ""  # optional dedicated inpainting model (9-channel UNet)
    # For a single-file checkpoint: a diffusers folder or Hub id of the same family whose
    # component configs describe it (diffusers fetches a default one; offline it can't).
    single_file_config: str = ""
    vae_tiling_above: int = 1024 * 1024  # pixels; larger images decode in tiles


@dataclass(frozen=True)
class DiscordConfig:
    guild_ids: tuple[int, ...] = ()
    api_url: str = ""
    gateway_url: str = ""
    admin_role: str = ""  # members with this role count as bot admins (besides Manage Server)
    progress_interval: float = 2.0  # seconds between progress edits of one message


@dataclass(frozen=True)
class StorageConfig:
    data_dir: str = "data"

    @property
    def database(self) -> Path:
        return Path(self.data_dir) / "sdbot.sqlite"

    @property
    def blobs(self) -> Path:
        return Path(self.data_dir) / "blobs"

    @property
    def loras(self) -> Path:
        return Path(self.data_dir) / "loras"


@dataclass(frozen=True)
class DefaultsConfig:
    sampler: str = "DPM++ 2M"
    schedule: str = "Karras"
    steps: int = 25
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    negative_prompt: str = ""


@dataclass(frozen=True)
class WorkersConfig:
    backend: str = "local"  # local | ray
    devices: tuple[str, ...] = ("auto",)  # "auto" = every CUDA GPU, else one CPU worker
    ray_address: str = "local"
    batch_size: int = 4
    max_attempts: int = 3
    preview_every: int = 4  # steps between preview images
    dtype: str = "auto"  # auto | float16 | bfloat16 | float32 (see pipeline.contract.devices)
    cpu_threads: int = 0  # torch threads of a CPU worker; 0 = torch's default
    # One pipeline call's budget: jobs × images × pixels; a larger claimed batch is split.
    max_batch_pixels: int = 4 * 1024 * 1024
    max_models: int = 2  # base models kept loaded per worker; least recently used go first


@dataclass(frozen=True)
class QueueConfig:
    max_queued_per_user: int = 5


@dataclass(frozen=True)
class LorasConfig:
    dir: str = ""  # server LoRA library; empty = <data_dir>/loras
    cache_mb: int = 2048  # adapters kept loaded on a worker, by size
    max_file_mb: int = 512


@dataclass(frozen=True)
class AttachmentsConfig:
    max_mb: float = 10.0


@dataclass(frozen=True)
class TrainingConfig:
    min_photos: int = 3
    max_photos: int = 20
    min_side: int = 256
    max_loras_per_member: int = 10
    max_lora_mb_per_member: int = 500
    chunk_steps: int = 50  # steps before a training job yields the worker to generation
    resolution: int = 0  # training image size; 0 = 512 for SD 1.x, 1024 for SDXL


@dataclass(frozen=True)
class Config:
    models: tuple[ModelConfig, ...]
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    defaults: DefaultsConfig = field(default_factory=DefaultsConfig)
    limits: Limits = field(default_factory=Limits)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    loras: LorasConfig = field(default_factory=LorasConfig)
    attachments: AttachmentsConfig = field(default_factory=AttachmentsConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    path: str = ""

    def model(self, name: str) -> ModelConfig:
        """The named model; "default" is the first one configured."""
        if name == "default":
            return self.models[0]
        for model in self.models:
            if model.name == name:
                return model
        names = ", ".join(m.name for m in self.models)
        raise ConfigError(f"unknown model {name!r}; configured models: {names}")

    @property
    def lora_dir(self) -> Path:
        return Path(self.loras.dir) if self.loras.dir else self.storage.loras


_SECTIONS: dict[str, type] = {
    "discord": DiscordConfig,
    "storage": StorageConfig,
    "defaults": DefaultsConfig,
    "limits": Limits,
    "workers": WorkersConfig,
    "queue": QueueConfig,
    "loras": LorasConfig,
    "attachments": AttachmentsConfig,
    "training": TrainingConfig,
}


def _section(cls: type, values: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**converted)


def config_from_dict(
    data: dict[str, Any], *, path: str = "", base_dir: Path | None = None
) -> Config:
    data = dict(data)
    models_table = data.pop("models", {})
    if not models_table:
        raise ConfigError(
            f"{path or 'config'}: no [models.NAME] table; configure at least one model"
        )
    models = tuple(_model(name, values, path, base_dir) for name, values in models_table.items())
    sections = {}
    for key, values in data.items():
        if key not in _SECTIONS:
            raise ConfigError(f"{path or 'config'}: unknown section [{key}]")
        sections[key] = _section(_SECTIONS[key], values, f"{path} [{key}]")
    if "storage" in sections and base_dir is not None:
        data_dir = Path(sections["storage"].data_dir)
        if not data_dir.is_absolute():
            sections["storage"] = StorageConfig(data_dir=str(base_dir / data_dir))
    if "workers" in sections:
        _check_workers(sections["workers"], path)
    return Config(models=models, path=path, **sections)


def _check_workers(workers: WorkersConfig, path: str) -> None:
    where = path or "config"
    for key in ("max_batch_pixels", "max_models"):
        if not isinstance(getattr(workers, key), int) or getattr(workers, key) < 1:
            raise ConfigError(f"{where}: workers.{key} must be a whole number of at least 1")
    if workers.dtype not in DTYPES:
        raise ConfigError(f"{where}: {bad_dtype_message(workers.dtype)}")
    for device in workers.devices:
        if error := device_syntax_error(str(device)):
            raise ConfigError(f"{where}: {error}")


def _model(name: str, values: dict[str, Any], path: str, base_dir: Path | None) -> ModelConfig:
    model = _section(ModelConfig, {"name": name, **values}, f"{path} [models.{name}]")
    if model.family not in ("auto", "sd1", "sdxl"):
        raise ConfigError(f"{path} [models.{name}] family must be auto, sd1 or sdxl")
    # Relative local paths are relative to the config file, not the working directory.
    if base_dir is not None:
        for key in ("source", "inpaint_source", "single_file_config"):
            value = getattr(model, key)
            if value.startswith(("./", "../")):
                model = dataclasses.replace(model, **{key: str((base_dir / value).resolve())})
    return model


def load_config(path: str | Path | None = None) -> Config:
    """Read config.toml (or $SDBOT_CONFIG, or the given path)."""
    path = Path(path or os.environ.get("SDBOT_CONFIG", "config.toml"))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found; copy config.toml from the repository "
            "or pass --config PATH"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config_from_dict(data, path=str(path), base_dir=path.resolve().parent)
