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
from pipeline.contract.families import DEFAULT, FAMILIES, names
from pipeline.contract.jobs import FLUX_LORA_LAYOUTS, JobError, Limits

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
    # A control model's (Flux.1 Canny/Depth) preprocessor for its input photo; "" = by
    # its name (depth for a Depth model, else canny).
    control_preprocessor: str = ""
    memory: str = "auto"  # how the weights are held: pipeline.contract.memory_plan.MEMORY_SETTINGS
    # What a job on this model gets for an option the member leaves out, over its family's
    # defaults and the member's /settings (None: the family's, else [defaults]):
    # `families.model_defaults`.
    sampler: str | None = None  # "Euler", "DPM++ 2M Karras": the name may carry the schedule
    schedule: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    guidance: float | None = None  # Distilled CFG Scale, for the families that have it
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None


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
    ray_connect_timeout_s: float = 30.0  # joining the cluster; longer is a PoolError naming it
    affinity: bool = True  # a batch goes to a free worker that holds its model, if any
    batch_size: int = 4
    max_attempts: int = 3
    preview_every: int = 4  # steps between preview images
    dtype: str = "auto"  # auto | float16 | bfloat16 | float32 (see pipeline.contract.devices)
    cpu_threads: int = 0  # torch threads of a CPU worker; 0 = torch's default
    # One pipeline call's budget: jobs × images × pixels; a larger claimed batch is split.
    max_batch_pixels: int = 4 * 1024 * 1024
    max_models: int = 2  # base models kept loaded per worker; least recently used go first
    compile: bool = False  # torch.compile the UNet and VAE decoder, warmed at start


@dataclass(frozen=True)
class QueueConfig:
    max_queued_per_user: int = 5


@dataclass(frozen=True)
class LorasConfig:
    dir: str = ""  # server LoRA library; empty = <data_dir>/loras
    cache_mb: int = 2048  # adapters kept loaded on a worker, by size
    max_file_mb: int = 512
    # With [workers] compile: UNet LoRAs per call held in the compiled graph's slots
    # (0 = none: every LoRA job runs eager), each up to this rank (pipeline.loras.slots).
    slots: int = 4
    max_rank: int = 32


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
    # Flux.1 LoRA files: "kohya" (sd-scripts' names) or "diffusers" (peft layout)
    flux_lora_layout: str = "kohya"


@dataclass(frozen=True)
class ControlNetConfig:
    """`[controlnets.NAME]`: one ControlNet unit members can pick."""

    name: str
    source: str  # Hub id, diffusers folder, or single-file .safetensors as Civitai ships
    family: str = DEFAULT.name  # sd1 | sdxl: the base models it fits
    preprocessor: str = "none"  # what turns a photo into this unit's map
    # keep: pose / keep: depth on /img2img use the first unit of that kind
    kind: str = ""  # "" | pose | depth | edges (what the unit keeps)


@dataclass(frozen=True)
class IPAdapterConfig:
    """`[ip_adapters.NAME]`: an IP-Adapter and its CLIP image encoder."""

    name: str
    source: str  # folder holding ip_adapter.safetensors, or the .safetensors/.bin file
    image_encoder: str = ""  # CLIP vision folder/Hub id; "" = SOURCE's image_encoder folder
    family: str = DEFAULT.name


@dataclass(frozen=True)
class ControlConfig:
    cache_mb: int = 4096  # ControlNets kept loaded on a worker, by size (LRU)
    depth_model: str = ""  # transformers depth-estimation Hub id or folder; "" = no depth
    pose_model: str = ""  # ViTPose (VitPoseForPoseEstimation) Hub id or folder; "" = no openpose
    pose_detector: str = ""  # object-detection model for the person boxes; "" = whole image
    segmentation_model: str = ""  # ADE20K image-segmentation Hub id or folder; "" = no seg


@dataclass(frozen=True)
class SafetyConfig:
    """Server defaults of the NSFW policy (per-server settings override them)."""

    policy: str = "block"  # block | spoiler | allow, outside age-restricted channels
    threshold: float = 0.6  # an explicit NudeNet label at or above this flags an image
    labels: dict[str, float] = field(default_factory=dict)  # label → its own threshold
    negative_prompt: str = ""  # added outside age-restricted channels
    blocked_ephemeral: bool = False  # block: the member still gets the image, ephemerally
    dms: str = "default"  # default: DMs follow `policy` | refuse: no generation in DMs
    detect: bool = True  # run the detector on every result and input photo


@dataclass(frozen=True)
class QuotasConfig:
    """Every member's quota until a server sets its own (0 = unlimited)."""

    images_per_day: int = 0
    gpu_seconds_per_day: int = 0
    trainings_per_week: int = 0


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""  # "127.0.0.1:9108" serves /metrics and /healthz; "" = off


@dataclass(frozen=True)
class EditConfig:
    """/edit: identity kept or retried (calibration in docs/DECISIONS.md, issue 25)."""

    min_identity: float = 0.55  # a result scoring below this (0..1) is redone with a new seed
    max_retries: int = 2  # redone at most this many times; then posted saying so
    default_model: str = ""  # /edit without a model: this one ("" = the first that edits)
    # A result flagged NSFW whose photo showed a real face is withheld even in age-restricted
    # channels unless this is on (per server: /admin settings edit.allow_nsfw_real_faces).
    allow_nsfw_real_faces: bool = False


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
    control: ControlConfig = field(default_factory=ControlConfig)
    controlnets: dict[str, ControlNetConfig] = field(default_factory=dict)
    ip_adapters: dict[str, IPAdapterConfig] = field(default_factory=dict)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    quotas: QuotasConfig = field(default_factory=QuotasConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    edit: EditConfig = field(default_factory=EditConfig)
    path: str = ""

    def model(self, name: str) -> ModelConfig:
        """The named model; "default" is the first one configured."""
        if name == "default":
            return self.models[0]
        for model in self.models:
            if model.name == name:
                return model
        names = ", ".join(dict.fromkeys(m.name for m in self.models))
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
    "control": ControlConfig,
    "safety": SafetyConfig,
    "quotas": QuotasConfig,
    "metrics": MetricsConfig,
    "edit": EditConfig,
}


def _section(cls: type, values: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    for key, value in converted.items():
        if isinstance(fields[key].default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, not {value!r}")
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
    controlnets = {
        name: _named(ControlNetConfig, "controlnets", name, values, path, base_dir)
        for name, values in data.pop("controlnets", {}).items()
    }
    ip_adapters = {
        name: _named(IPAdapterConfig, "ip_adapters", name, values, path, base_dir)
        for name, values in data.pop("ip_adapters", {}).items()
    }
    sections = {}
    for key, values in data.items():
        if key not in _SECTIONS:
            raise ConfigError(f"{path or 'config'}: unknown section [{key}]")
        sections[key] = _section(_SECTIONS[key], values, f"{path} [{key}]")
    if "safety" in sections:
        _check_safety(sections["safety"], f"{path} [safety]")
    if "metrics" in sections and sections["metrics"].listen:
        _listen_address(sections["metrics"].listen, f"{path} [metrics] listen")
    if "storage" in sections and base_dir is not None:
        data_dir = Path(sections["storage"].data_dir)
        if not data_dir.is_absolute():
            sections["storage"] = StorageConfig(data_dir=str(base_dir / data_dir))
    if "control" in sections and base_dir is not None:
        sections["control"] = _relative(
            sections["control"],
            ("depth_model", "pose_model", "pose_detector", "segmentation_model"),
            base_dir,
        )
    control = sections.get("control")
    if control is not None and control.pose_detector and not control.pose_model:
        raise ConfigError(f"{path} [control]: pose_detector is set but pose_model is not")
    if "workers" in sections:
        _check_workers(sections["workers"], path)
    if "loras" in sections:
        _check_loras(sections["loras"], path)
    if "training" in sections and sections["training"].flux_lora_layout not in FLUX_LORA_LAYOUTS:
        raise ConfigError(
            f"{path or 'config'}: training.flux_lora_layout must be "
            f"{' or '.join(repr(x) for x in FLUX_LORA_LAYOUTS)}, "
            f"not {sections['training'].flux_lora_layout!r}"
        )
    if "edit" in sections:
        _check_edit(sections["edit"], path)
        _check_edit_model(sections["edit"].default_model, models, path)
    return Config(
        models=models, path=path, controlnets=controlnets, ip_adapters=ip_adapters, **sections
    )


def _named(cls: type, table: str, name: str, values: Any, path: str, base_dir: Path | None):
    where = f"{path} [{table}.{name}]"
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a table")
    entry = _section(cls, {"name": name, **values}, where)
    if not entry.source:
        raise ConfigError(f"{where}: source is empty; set a Hub id, folder or file")
    if entry.family not in FAMILIES:
        raise ConfigError(
            f"{where} family must be {names(FAMILIES.values())}, not {entry.family!r}"
        )
    if cls is ControlNetConfig:
        from pipeline.contract.control import PREPROCESSORS, canonical_preprocessor

        if canonical_preprocessor(entry.preprocessor) not in PREPROCESSORS:
            raise ConfigError(
                f"{where}: unknown preprocessor {entry.preprocessor!r}; "
                f"known: {', '.join(PREPROCESSORS)}"
            )
        if entry.kind not in ("", "pose", "depth", "edges"):
            raise ConfigError(f"{where}: kind must be pose, depth, edges or empty")
    keys = ("source", "image_encoder") if cls is IPAdapterConfig else ("source",)
    return _relative(entry, keys, base_dir) if base_dir is not None else entry


def _relative(entry: Any, keys: tuple[str, ...], base_dir: Path) -> Any:
    for key in keys:
        value = getattr(entry, key)
        if value.startswith(("./", "../")):
            entry = dataclasses.replace(entry, **{key: str((base_dir / value).resolve())})
    return entry


def _check_safety(safety: SafetyConfig, where: str) -> None:
    from pipeline.contract.safety import NUDENET_LABELS, POLICIES

    if safety.policy not in POLICIES:
        raise ConfigError(f"{where} policy must be one of {', '.join(POLICIES)}")
    if safety.dms not in ("default", "refuse"):
        raise ConfigError(f"{where} dms must be default or refuse")
    for label, value in {"threshold": safety.threshold, **safety.labels}.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"{where} {label} must be a number from 0 to 1")
    unknown = sorted(set(safety.labels) - NUDENET_LABELS)
    if unknown:
        raise ConfigError(
            f"{where}.labels: unknown NudeNet label(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(NUDENET_LABELS))}"
        )


def _listen_address(text: str, where: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port
        raise ConfigError(f"{where} must be HOST:PORT, e.g. 127.0.0.1:9108, not {text!r}")
    return host, int(port)


def listen_address(config: Config) -> tuple[str, int] | None:
    """`[metrics] listen` as (host, port), or None when the listener is off."""
    text = config.metrics.listen
    return _listen_address(text, "[metrics] listen") if text else None


def _check_workers(workers: WorkersConfig, path: str) -> None:
    where = path or "config"
    for key in ("max_batch_pixels", "max_models"):
        if not isinstance(getattr(workers, key), int) or getattr(workers, key) < 1:
            raise ConfigError(f"{where}: workers.{key} must be a whole number of at least 1")
    timeout = workers.ray_connect_timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"{where}: workers.ray_connect_timeout_s must be a number of seconds > 0")
    if workers.dtype not in DTYPES:
        raise ConfigError(f"{where}: {bad_dtype_message(workers.dtype)}")
    for device in workers.devices:
        if error := device_syntax_error(str(device)):
            raise ConfigError(f"{where}: {error}")


def _check_loras(loras: LorasConfig, path: str) -> None:
    where = path or "config"
    for key, low in (("slots", 0), ("max_rank", 1)):
        value = getattr(loras, key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 64:
            raise ConfigError(f"{where}: loras.{key} must be a whole number from {low} to 64")


def _check_edit(edit: EditConfig, path: str) -> None:
    where = path or "config"
    score = edit.min_identity
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
        raise ConfigError(f"{where}: edit.min_identity must be a number from 0 to 1")
    retries = edit.max_retries
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
        raise ConfigError(f"{where}: edit.max_retries must be a whole number from 0 to 10")


def _check_edit_model(name: str, models: tuple[ModelConfig, ...], path: str) -> None:
    if name and name not in {m.name for m in models}:
        known = ", ".join(m.name for m in models)
        raise ConfigError(
            f"{path or 'config'}: edit.default_model {name!r} is not a configured model; "
            f"configured: {known}"
        )


def _model(name: str, values: dict[str, Any], path: str, base_dir: Path | None) -> ModelConfig:
    model = _section(ModelConfig, {"name": name, **values}, f"{path} [models.{name}]")
    if model.family != "auto" and model.family not in FAMILIES:
        raise ConfigError(f"{path} [models.{name}] family must be auto, {names(FAMILIES.values())}")
    # Relative local paths are relative to the config file, not the working directory.
    if base_dir is not None:
        for key in ("source", "inpaint_source", "single_file_config"):
            value = getattr(model, key)
            if value.startswith(("./", "../")):
                model = dataclasses.replace(model, **{key: str((base_dir / value).resolve())})
    _check_memory(model, f"{path} [models.{name}]")
    _check_model_defaults(model, f"{path} [models.{name}]")
    if model.control_preprocessor:
        from pipeline.contract.control import PREPROCESSORS, canonical_preprocessor

        if canonical_preprocessor(model.control_preprocessor) not in PREPROCESSORS:
            raise ConfigError(
                f"{path} [models.{name}]: unknown control_preprocessor "
                f"{model.control_preprocessor!r}; known: {', '.join(PREPROCESSORS)}"
            )
    return model


def _check_model_defaults(model: ModelConfig, where: str) -> None:
    """A model's own defaults: the right kind of value, and a sampler some family takes
    (whether this model's family takes it is said with the first job, naming the model)."""
    from pipeline.contract.families.flow import resolve_flow
    from pipeline.contract.samplers import resolve

    numbers = {"steps": (1, 10_000, int), "width": (8, 65_536, int), "height": (8, 65_536, int)}
    numbers |= {"cfg_scale": (0.0, 100.0, float), "guidance": (0.0, 100.0, float)}
    for key, (low, high, kind) in numbers.items():
        value = getattr(model, key)
        if value is None:
            continue
        wrong = isinstance(value, bool) or not isinstance(
            value, (int, float) if kind is float else int
        )
        if wrong or not low <= value <= high:
            what = "a whole number" if kind is int else "a number"
            raise ConfigError(f"{where}: {key} must be {what} from {low} to {high}, not {value!r}")
    for key in ("sampler", "schedule", "negative_prompt"):
        if getattr(model, key) is not None and not isinstance(getattr(model, key), str):
            raise ConfigError(f"{where}: {key} must be a string")
    if model.sampler is None and model.schedule is None:
        return
    sampler, schedule = model.sampler or "Euler", model.schedule or "Automatic"
    errors = []
    for check in (resolve, resolve_flow):
        try:
            check(sampler, schedule)
            return
        except JobError as exc:
            errors.append(str(exc))
    raise ConfigError(f"{where}: {errors[0]}")


def _check_memory(model: ModelConfig, where: str) -> None:
    from pipeline.contract.memory_plan import MEMORY_SETTINGS

    if model.memory not in MEMORY_SETTINGS:
        raise ConfigError(f"{where} memory must be one of {', '.join(MEMORY_SETTINGS)}")


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
