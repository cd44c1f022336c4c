"""`sdbot edit IMAGE "instruction" …`: one /edit job in this process, written as PNGs.

The same job `/edit` queues: the photo edited by the model's instruction-editing
pipeline (or, for SD 1.x/SDXL, the classic route), each result measured for the
person's identity and redrawn below `[edit] min_identity` (`pipeline/generate/editing.py`).
Prints each file with its seed, identity and tries.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bot.cli.common import CliError, command_config
from bot.cli.generate import (
    _Blobs,
    _first_device,
    _model_name,
    _progress_bar,
    _read_input,
    add_place_options,
    output_paths,
    write_atomically,
)
from pipeline.contract.config import Config
from pipeline.contract.jobs import GenerateSpec, LoraRef


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("edit", help="edit a photo by instruction, keeping the person")
    parser.add_argument("image", type=Path, help="the photo to edit")
    parser.add_argument("instruction", help='what to change, e.g. "make him older"')
    parser.add_argument("--image2", type=Path, help="a second image (edit models that take it)")
    parser.add_argument("--image3", type=Path, help="a third image")
    parser.add_argument(
        "--keep",
        choices=["face", "background", "none"],
        default="none",
        help="put the photo's face (or background) back over the result",
    )
    parser.add_argument(
        "--face", type=int, default=0, help="which face is the person: 1..n left to right"
    )
    parser.add_argument("--model", default="default", help="config model name, folder or file")
    parser.add_argument("--seed", type=int, default=None, help="random when absent")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg", type=float, default=None, help="CFG scale")
    parser.add_argument(
        "--strength", type=float, default=None, help="SD 1.x/SDXL (classic route): 0..1"
    )
    parser.add_argument("--face-fix", action="store_true", help="repaint faces afterwards")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME[:WEIGHT]",
        help="a LoRA from --lora-dir (repeatable); it must be of the model's family",
    )
    add_place_options(parser, "edit.png")
    parser.set_defaults(handler=edit)


def build_edit_spec(args: argparse.Namespace, config: Config, blobs: _Blobs) -> GenerateSpec:
    """The GenerateSpec /edit would queue for these options; checked, nothing runs yet."""
    from pipeline.contract.families import defaults_for, family_of_model
    from pipeline.contract.images import working_size

    model = _model_name(config, args.model)
    d = defaults_for(config, model)
    family = family_of_model(config.model(model))
    limit = config.limits.max_input_pixels
    paths = [p for p in (args.image, args.image2, args.image3) if p is not None]
    loaded = [_read_input(path, "image", limit) for path in paths]
    shas = [blobs.add_bytes(data) for data, _ in loaded]
    photo = loaded[0][1]
    # The model works within the default size's pixels (as /edit: the member's budget);
    # the result comes back at the photo's size.
    budget = min(d.width * d.height, config.limits.max_pixels)
    width, height = family.fit_size(*working_size(photo.width, photo.height, budget))
    values: dict[str, Any] = dict(
        prompt=args.instruction,
        negative_prompt=d.negative_prompt,
        mode="edit",
        model=model,
        sampler=d.sampler,
        schedule=d.schedule,
        steps=d.steps if args.steps is None else args.steps,
        cfg_scale=d.cfg_scale if args.cfg is None else args.cfg,
        seed=args.seed,
        width=width,
        height=height,
        count=args.count,
        image=shas[0],
        images=tuple(shas[1:]),
        keep=None if args.keep == "none" else args.keep,
        face=args.face,
        face_fix=args.face_fix,
        loras=_loras(args, config, blobs),
    )
    if args.strength is not None:
        values["strength"] = args.strength
    spec = GenerateSpec(**values).with_seed()
    spec.check(config.limits)
    family.check_job(spec)  # a model that cannot edit, or too many images: nothing runs
    if spec.keep and not _faces(photo):
        raise CliError(f"no face found in {args.image.name}; keep: {spec.keep} needs one")
    return spec


def _loras(args: argparse.Namespace, config: Config, blobs: _Blobs) -> tuple[LoraRef, ...]:
    if not args.lora:
        return ()
    from pipeline.loras.adapters import resolve_lora_names

    tags = " ".join(f"<lora:{option}>" for option in args.lora)  # NAME or NAME:WEIGHT
    refs = []
    for ref, path in resolve_lora_names(tags, args.lora_dir or config.lora_dir):
        blobs.add_file(Path(path), ref.sha256)
        refs.append(ref)
    return tuple(refs)


def _faces(photo: Any) -> int:
    from pipeline.faces.detection import detect_faces

    return len(detect_faces(photo))


def edit(args: argparse.Namespace) -> int:
    config = command_config(args, model=args.model)
    blobs = _Blobs()
    spec = build_edit_spec(args, config, blobs)
    from pipeline.generate.modes import run_generation
    from pipeline.loras.adapters import LoraCache
    from pipeline.models.loading import ModelCache

    model = ModelCache(config, args.device or _first_device(config)).get(spec.model)
    loras = LoraCache(model.pipe, max_bytes=config.loras.cache_mb * 2**20)
    [images] = run_generation(
        model,
        [spec],
        blobs=blobs,
        loras=loras,
        on_step=_progress_bar(spec.count),
        preview_every=0,
        edit=config.edit,
    )
    for path, image in zip(output_paths(args.out, spec.count), images):
        write_atomically(path, image.png)
        identity = "no face" if image.identity is None else f"{image.identity:.2f}"
        tries = f"{image.tries} tr{'y' if image.tries == 1 else 'ies'}"
        print(f"{path}  seed {image.seed}  identity {identity}  {tries}")
    for notice in dict.fromkeys(n for image in images for n in image.notices):
        print(f"note: {notice}")
    return 0
