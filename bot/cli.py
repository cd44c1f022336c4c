"""`sdbot`: run the bot, or do one job offline.

    sdbot run                     the Discord bot (reads config.toml and DISCORD_TOKEN)
    sdbot generate PROMPT …       one image job, written as PNGs with infotext
    sdbot train NAME PHOTO …      one personal model, registered in the database
    sdbot tiny-model DIR          a tiny random-weight model for tests and demos
    sdbot doctor                  what works and what doesn't on this machine

This module lives in bot/ because `run` and `train` need the bot's store; everything
that touches torch is imported inside the command that needs it, so `sdbot run`
keeps the bot process free of torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.contract.config import Config, ConfigError, ModelConfig, config_from_dict, load_config
from pipeline.contract.jobs import GenerateSpec, JobError, LoraRef

EXIT_USAGE = 2


class CliError(Exception):
    """A one-line message for the terminal; the command exits non-zero."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose and args.command != "run":
        from pipeline.workers.quiet import quiet_libraries

        quiet_libraries()
    try:
        return args.handler(args) or 0
    except (CliError, ConfigError, JobError, ValueError, OSError) as exc:
        # ValueError covers every user-safe error class of the pipeline (JobError,
        # ImageInputError, LoraError, DatasetError…): one line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence for ModelError etc.
        user_safe = {"ModelError", "BlobError", "StoreError", "PoolError"}
        if user_safe & {cls.__name__ for cls in type(exc).__mro__}:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdbot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="config file (default: $SDBOT_CONFIG or ./config.toml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the Discord bot")
    run.set_defaults(handler=_cmd_run)

    gen = commands.add_parser("generate", help="generate images offline")
    gen.add_argument("prompt", nargs="?", help="the prompt (or --from-png)")
    gen.add_argument(
        "--from-png",
        type=Path,
        metavar="FILE",
        help="re-run the parameters of a PNG made by sdbot or A1111; other options override",
    )
    gen.add_argument("--negative", default=None, help="negative prompt")
    gen.add_argument("--model", default="default", help="config model name, folder or file")
    gen.add_argument("--sampler", default=None, help='e.g. "Euler a", "DPM++ 2M Karras"')
    gen.add_argument("--schedule", default=None, help="Automatic, Karras, Exponential, …")
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--cfg", type=float, default=None, help="CFG scale")
    gen.add_argument("--seed", type=int, default=None, help="random when absent")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--count", type=int, default=1)
    gen.add_argument("--image", type=Path, help="input image: img2img, inpaint or outpaint")
    gen.add_argument("--strength", type=float, default=None, help="denoising strength 0..1")
    gen.add_argument("--mask", type=Path, help="inpaint mask, white = repaint")
    gen.add_argument(
        "--outpaint", metavar="DIRECTION:PIXELS", help="left|right|up|down|all, e.g. right:128"
    )
    gen.add_argument(
        "--keep",
        choices=["face", "background"],
        help="inpaint everything but the face, or the person but not the background",
    )
    gen.add_argument("--face-fix", action="store_true", help="repaint faces afterwards")
    gen.add_argument(
        "--lora-dir",
        type=Path,
        default=None,
        help="folder where <lora:NAME:w> finds NAME.safetensors",
    )
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: config)")
    gen.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG")
    gen.set_defaults(handler=_cmd_generate)

    tiny = commands.add_parser("tiny-model", help="write a tiny random-weight model")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--xl", action="store_true", help="SDXL layout")
    tiny.add_argument("--inpaint", action="store_true", help="9-channel inpainting UNet")
    tiny.add_argument(
        "--single-file",
        action="store_true",
        help="also write DIR/model.safetensors in the original (A1111) layout",
    )
    tiny.set_defaults(handler=_cmd_tiny)

    doctor = commands.add_parser("doctor", help="check GPU, models, database and token")
    doctor.set_defaults(handler=_cmd_doctor)

    train = commands.add_parser("train", help="train a personal model offline")
    train.add_argument("name")
    train.add_argument("photos", nargs="*", type=Path)
    train.add_argument("--zip", type=Path, help="a .zip of photos")
    train.add_argument("--method", choices=["lora", "loha", "lokr"], default="lora")
    train.add_argument("--steps", type=int, default=0, help="0: about 100 per photo")
    train.add_argument("--subject", default="person", help="what the photos show")
    train.add_argument("--user", default="cli", help="member id that owns the model")
    train.add_argument("--model", default="default")
    train.add_argument("--resolution", type=int, default=None)
    train.set_defaults(handler=_cmd_train)
    return parser


# --- config and models ---------------------------------------------------------------


def _config(args: argparse.Namespace, *, model: str | None = None) -> Config:
    """The config file, or — for offline use with a model path and no config — a
    config holding just that model."""
    path = args.config or os.environ.get("SDBOT_CONFIG") or "config.toml"
    if Path(path).exists() or args.config:
        config = load_config(path)
    elif model and Path(model).exists():
        config = config_from_dict({"models": {Path(model).stem: {"source": str(model)}}})
    else:
        raise CliError(f"config file {path} not found; pass --config PATH or --model PATH")
    if model and model != "default" and Path(model).exists():
        extra = ModelConfig(name=Path(model).stem, source=str(Path(model).resolve()))
        config = Config(**{**config.__dict__, "models": (extra, *config.models)})
    return config


def _model_name(config: Config, requested: str) -> str:
    if requested == "default" or Path(requested).exists():
        return config.models[0].name if requested == "default" else Path(requested).stem
    return config.model(requested).name  # raises with the list of names


# --- generate ------------------------------------------------------------------------


class _Blobs:
    """Blob lookup for offline jobs: input files are read where they lie."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}
        self.data: dict[str, bytes] = {}

    def add_bytes(self, data: bytes) -> str:
        from pipeline.contract.blobs import sha256_hex

        sha = sha256_hex(data)
        self.data[sha] = data
        return sha

    def add_file(self, path: Path, sha: str) -> None:
        self.files[sha] = path

    def get(self, sha: str) -> bytes:
        return self.data[sha] if sha in self.data else self.files[sha].read_bytes()

    def path(self, sha: str) -> Path:
        return self.files[sha]


def _read_input(path: Path, name: str, limit: int):
    from pipeline.contract.images import open_image

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CliError(f"{name} file {path} does not exist") from None
    return data, open_image(data, max_pixels=limit, name=f"{name} {path.name}")


def build_generate_spec(args: argparse.Namespace, config: Config, blobs: _Blobs) -> GenerateSpec:
    d = config.defaults
    values: dict[str, Any] = dict(
        prompt=args.prompt,
        negative_prompt=d.negative_prompt if args.negative is None else args.negative,
        model=_model_name(config, args.model),
        sampler=args.sampler or d.sampler,
        schedule=args.schedule or (d.schedule if not args.sampler else "Automatic"),
        steps=d.steps if args.steps is None else args.steps,
        cfg_scale=d.cfg_scale if args.cfg is None else args.cfg,
        seed=args.seed,
        width=args.width or d.width,
        height=args.height or d.height,
        count=args.count,
        face_fix=args.face_fix,
        keep=args.keep,
    )
    if args.strength is not None:
        values["strength"] = args.strength
    if args.image:
        values.update(_image_inputs(args, config, blobs))
    elif args.mask or args.outpaint or args.keep:
        raise CliError("--mask, --keep and --outpaint need an --image")
    values["loras"] = _loras(args, config, blobs)
    spec = GenerateSpec(**values).with_seed()
    spec.check(config.limits)
    return spec


def _image_inputs(args: argparse.Namespace, config: Config, blobs: _Blobs) -> dict[str, Any]:
    from pipeline.contract.images import working_size

    limit = config.limits.max_input_pixels
    data, image = _read_input(args.image, "image", limit)
    values: dict[str, Any] = {"image": blobs.add_bytes(data), "mode": "img2img"}
    width, height = working_size(image.width, image.height, config.limits.max_pixels)
    values["width"], values["height"] = args.width or width, args.height or height
    if args.mask:
        mask_data, mask = _read_input(args.mask, "mask", limit)
        if mask.size != image.size:
            raise CliError(
                f"the mask is {mask.width}×{mask.height} but the image is "
                f"{image.width}×{image.height}; they must be the same size"
            )
        values.update(mode="inpaint", mask=blobs.add_bytes(mask_data))
    elif args.keep:
        values["mode"] = "inpaint"
        _require_face(image)
    if args.outpaint:
        direction, _, pixels = args.outpaint.partition(":")
        try:
            values.update(
                mode="outpaint", outpaint_direction=direction, outpaint_pixels=int(pixels or 128)
            )
        except ValueError:
            raise CliError(
                f"--outpaint wants DIRECTION:PIXELS, e.g. right:128, not {args.outpaint!r}"
            ) from None
    return values


def _require_face(image) -> None:
    from pipeline.faces.detection import NoFaceFound, detect_faces

    if not detect_faces(image):
        raise CliError(str(NoFaceFound()))


def _loras(args: argparse.Namespace, config: Config, blobs: _Blobs) -> tuple[LoraRef, ...]:
    if "<lora:" not in args.prompt and "<lyco:" not in args.prompt:
        return ()
    from pipeline.loras.adapters import resolve_lora_names

    refs = []
    for ref, path in resolve_lora_names(args.prompt, args.lora_dir or config.lora_dir):
        blobs.add_file(Path(path), ref.sha256)
        refs.append(ref)
    return tuple(refs)


def _progress_bar(total_images: int):
    def on_step(step: int, total: int, _preview: bytes | None) -> None:
        width = 30
        filled = int(width * step / max(total, 1))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] step {step}/{total}")
        if step >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return on_step


def _cmd_generate(args: argparse.Namespace) -> int:
    config = _config(args, model=args.model)
    blobs = _Blobs()
    pasted = _from_png(args, config) if args.from_png else None
    if not args.prompt:
        raise CliError("generate needs a prompt, or --from-png FILE")
    spec = build_generate_spec(args, config, blobs)
    if pasted is not None:
        _check_lora_hashes(spec, pasted, blobs)
    from pipeline.generate.modes import run_generation
    from pipeline.loras.adapters import LoraCache
    from pipeline.models.loading import ModelCache

    models = ModelCache(config, args.device or _first_device(config))
    model = models.get(spec.model)
    loras = LoraCache(model.pipe, max_bytes=config.loras.cache_mb * 2**20)
    results = run_generation(
        model, [spec], blobs=blobs, loras=loras, on_step=_progress_bar(spec.count), preview_every=0
    )
    for path, image in zip(output_paths(args.out, spec.count), results[0]):
        write_atomically(path, image.png)
        print(f"{path}  seed {image.seed}")
    return 0


def _from_png(args: argparse.Namespace, config: Config):
    """Fill the options the command line leaves unset from the PNG's parameters; say on
    stderr, one line each, what of them is not re-run here."""
    from pipeline.contract.infotext import generation_settings, read_infotext

    try:
        text = read_infotext(args.from_png.read_bytes())
    except FileNotFoundError:
        raise CliError(f"{args.from_png} does not exist") from None
    except Exception:  # noqa: BLE001 - PIL's many decode errors
        raise CliError(f"{args.from_png} is not a PNG image that can be read") from None
    if not text:
        raise CliError(f"{args.from_png} carries no generation parameters")
    pasted = generation_settings(text)
    fields = pasted.fields
    args.prompt = args.prompt or pasted.prompt
    args.negative = pasted.negative_prompt if args.negative is None else args.negative
    for option, key in (("steps", "steps"), ("cfg", "cfg_scale"), ("seed", "seed")):
        if getattr(args, option) is None and key in fields:
            setattr(args, option, fields[key])
    for option in ("width", "height"):
        if getattr(args, option) is None and option in fields:
            setattr(args, option, fields[option])
    if args.sampler is None and "sampler" in fields:
        args.sampler = fields["sampler"]
        args.schedule = args.schedule or fields.get("schedule", "Automatic")
    args.face_fix = args.face_fix or fields.get("face_fix", False)
    names = [m.name for m in config.models]
    if args.model == "default" and pasted.model in names:
        args.model = pasted.model
    elif pasted.model and args.model == "default":
        hashed = f" (hash {pasted.model_hash})" if pasted.model_hash else ""
        print(
            f"note: the image was made with model {pasted.model}{hashed}, which this config "
            f"does not have; using {names[0]}",
            file=sys.stderr,
        )
    if pasted.not_applied:
        print(f"note: not re-run here: {'; '.join(pasted.not_applied)}", file=sys.stderr)
    return pasted


def _check_lora_hashes(spec: GenerateSpec, pasted, blobs: _Blobs) -> None:
    from pipeline.loras.adapters import lora_hash

    for ref in spec.loras:
        wanted = pasted.lora_hashes.get(ref.name)
        found = lora_hash(blobs.path(ref.sha256))
        if wanted and not (found.startswith(wanted) or wanted.startswith(found)):
            print(
                f"note: LoRA {ref.name} is not the file the image was made with "
                f"(hash {found}, the image names {wanted})",
                file=sys.stderr,
            )


def _first_device(config: Config) -> str:
    device = config.workers.devices[0] if config.workers.devices else "auto"
    return device


def output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(1, count + 1)]


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


# --- the other commands --------------------------------------------------------------


def _cmd_tiny(args: argparse.Namespace) -> int:
    from pipeline.models.tiny import write_tiny_model

    path = write_tiny_model(args.dir, xl=args.xl, inpaint=args.inpaint)
    kind = "SDXL" if args.xl else "SD 1.x"
    print(f"wrote a tiny {kind}{' inpainting' if args.inpaint else ''} model to {path}")
    if args.single_file:
        from pipeline.models.single_file import export_folder

        checkpoint = export_folder(path, path / "model.safetensors")
        print(f"and its single-file checkpoint to {checkpoint}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from bot.launcher import run_bot

    return run_bot(_config(args))


def _cmd_doctor(args: argparse.Namespace) -> int:
    from pipeline.workers.doctor import run_doctor

    return run_doctor(_config(args))


def _cmd_train(args: argparse.Namespace) -> int:
    from bot.offline_train import train_offline

    return train_offline(args, _config(args, model=args.model))


if __name__ == "__main__":
    sys.exit(main())
