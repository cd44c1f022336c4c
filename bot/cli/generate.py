"""`sdbot generate PROMPT …`: one image job in this process, written as PNGs with infotext."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from bot.cli.common import CliError, command_config
from pipeline.contract.config import Config
from pipeline.contract.families import defaults_for, model_guidance
from pipeline.contract.jobs import GenerateSpec, LoraRef
from pipeline.contract.model_names import resolve_model


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("generate", help="generate images offline")
    parser.add_argument("prompt", nargs="?", help="the prompt (or --from-png)")
    parser.add_argument(
        "--from-png",
        type=Path,
        metavar="FILE",
        help="re-run the parameters of a PNG made by sdbot or A1111; other options override",
    )
    parser.add_argument("--negative", default=None, help="negative prompt")
    parser.add_argument("--model", default="default", help="config model name, folder or file")
    parser.add_argument("--sampler", default=None, help='e.g. "Euler a", "DPM++ 2M Karras"')
    parser.add_argument("--schedule", default=None, help="Automatic, Karras, Exponential, …")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg", type=float, default=None, help="CFG scale")
    parser.add_argument(
        "--guidance", type=float, default=None, help="Distilled CFG Scale (Flux.1 dev: 3.5)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random when absent")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--image", type=Path, help="input image: img2img, inpaint or outpaint")
    parser.add_argument(
        "--edit",
        type=Path,
        action="append",
        default=[],
        metavar="IMAGE",
        help="edit these images by the prompt's instruction (repeatable; edit models)",
    )
    parser.add_argument("--strength", type=float, default=None, help="denoising strength 0..1")
    parser.add_argument("--mask", type=Path, help="inpaint mask, white = repaint")
    parser.add_argument(
        "--outpaint", metavar="DIRECTION:PIXELS", help="left|right|up|down|all, e.g. right:128"
    )
    parser.add_argument(
        "--keep",
        choices=["face", "background"],
        help="inpaint everything but the face, or the person but not the background",
    )
    parser.add_argument("--face-fix", action="store_true", help="repaint faces afterwards")
    parser.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="NAME[:IMAGE[:WEIGHT[:START:END]]]",
        help="a ControlNet unit from [controlnets.NAME] (repeatable); no IMAGE: the --image",
    )
    parser.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="IMAGE[:WEIGHT]",
        help="IP-Adapter reference image (repeatable: several are averaged)",
    )
    parser.add_argument(
        "--ip-adapter", default=None, help="[ip_adapters.NAME] (default: the first)"
    )
    add_place_options(parser, "out.png")
    parser.set_defaults(handler=generate)


def add_place_options(parser: argparse.ArgumentParser, out: str) -> None:
    """Where an offline image job finds its LoRAs, runs and writes (generate, edit)."""
    parser.add_argument(
        "--lora-dir",
        type=Path,
        default=None,
        help="folder where LoRA NAME is NAME.safetensors (<lora:NAME:w>, --lora)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: config)")
    parser.add_argument("--out", type=Path, default=Path(out), help="output PNG")


def _model_name(config: Config, requested: str) -> str:
    return resolve_model(config, requested)[1].name  # raises with the list of names


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
    from pipeline.contract.families import family_of_model

    model = _model_name(config, args.model)
    d = defaults_for(config, model)
    family = family_of_model(config.model(model))
    values: dict[str, Any] = dict(
        prompt=args.prompt,
        negative_prompt=d.negative_prompt if args.negative is None else args.negative,
        model=model,
        sampler=args.sampler or d.sampler,
        schedule=args.schedule or (d.schedule if not args.sampler else "Automatic"),
        steps=d.steps if args.steps is None else args.steps,
        cfg_scale=d.cfg_scale if args.cfg is None else args.cfg,
        # [models.NAME] guidance, else None: the family's own (the worker asks it)
        guidance=args.guidance if args.guidance is not None else model_guidance(config, model),
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
        values.update(_image_inputs(args, config, blobs, family))
    elif args.mask or args.outpaint or args.keep:
        raise CliError("--mask, --keep and --outpaint need an --image")
    values["loras"] = _loras(args, config, blobs)
    if args.control or args.reference:
        from bot.cogs.control_options import cli_control

        values.update(cli_control(args, config, blobs, _read_input))
    if args.edit:
        values.update(_edit_inputs(args, config, blobs, values))
    spec = GenerateSpec(**values).with_seed()
    spec.check(config.limits)
    family.check_job(spec)  # a mode, size or image count the model lacks: nothing runs
    if spec.control or spec.reference:
        from pipeline.contract.control import check_against_config

        named = config.model(spec.model).family
        check_against_config(spec.control, spec.reference, config, named)
    return spec


def _edit_inputs(
    args: argparse.Namespace, config: Config, blobs: _Blobs, values: dict[str, Any]
) -> dict[str, Any]:
    """--edit IMAGE…: the first image sets the output size unless --width/--height do."""
    from pipeline.contract.families import family_of_model
    from pipeline.contract.images import working_size

    if args.image:
        raise CliError("give the images to edit with --edit, not --image")
    limit = config.limits.max_input_pixels
    loaded = [_read_input(path, "image", limit) for path in args.edit]
    shas = [blobs.add_bytes(data) for data, _ in loaded]
    first = loaded[0][1]
    size = working_size(first.width, first.height, config.limits.max_pixels)
    family = family_of_model(config.model(values["model"]))
    width, height = family.fit_size(*size)
    return dict(
        mode="edit",
        image=shas[0],
        images=tuple(shas[1:]),
        width=args.width or width,
        height=args.height or height,
    )


def _image_inputs(
    args: argparse.Namespace, config: Config, blobs: _Blobs, family: Any
) -> dict[str, Any]:
    from pipeline.contract.images import working_size

    limit = config.limits.max_input_pixels
    data, image = _read_input(args.image, "image", limit)
    values: dict[str, Any] = {"image": blobs.add_bytes(data), "mode": "img2img"}
    width, height = family.fit_size(
        *working_size(image.width, image.height, config.limits.max_pixels)
    )
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


def generate(args: argparse.Namespace) -> int:
    config = command_config(args, model=args.model)
    blobs = _Blobs()
    pasted = _from_png(args, config) if args.from_png else None
    if not args.prompt:
        raise CliError("generate needs a prompt, or --from-png FILE")
    spec = build_generate_spec(args, config, blobs)
    if pasted is not None:
        _check_lora_hashes(spec, pasted, blobs)
    from pipeline.control.apply import ControlCache
    from pipeline.generate.modes import run_generation
    from pipeline.loras.adapters import LoraCache
    from pipeline.models.loading import ModelCache

    models = ModelCache(config, args.device or _first_device(config))
    model = models.get(spec.model)
    loras = LoraCache(model.pipe, max_bytes=config.loras.cache_mb * 2**20)
    results = run_generation(
        model,
        [spec],
        blobs=blobs,
        loras=loras,
        on_step=_progress_bar(spec.count),
        preview_every=0,
        control=ControlCache(config),
        edit=config.edit,
    )
    for path, image in zip(output_paths(args.out, spec.count), results[0]):
        write_atomically(path, image.png)
        print(f"{path}  seed {image.seed}")
    for notice in dict.fromkeys(n for image in results[0] for n in image.notices):
        print(f"note: {notice}")
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
    for option, key in (
        ("steps", "steps"),
        ("cfg", "cfg_scale"),
        ("guidance", "guidance"),
        ("seed", "seed"),
    ):
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
