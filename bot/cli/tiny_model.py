"""`sdbot tiny-model DIR`: a tiny random-weight model for tests and demos."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("tiny-model", help="write a tiny random-weight model")
    parser.add_argument("dir", type=Path)
    parser.add_argument("--xl", action="store_true", help="SDXL layout")
    parser.add_argument("--inpaint", action="store_true", help="9-channel inpainting UNet")
    parser.add_argument(
        "--single-file",
        action="store_true",
        help="also write DIR/model.safetensors in the original (A1111) layout",
    )
    parser.add_argument("--controlnet", action="store_true", help="also a tiny ControlNet")
    parser.add_argument("--ip-adapter", action="store_true", help="also a tiny IP-Adapter")
    parser.add_argument("--depth", action="store_true", help="also a tiny depth model")
    parser.add_argument(
        "--pose", action="store_true", help="also a tiny pose model and person detector (openpose)"
    )
    parser.add_argument(
        "--segmentation", action="store_true", help="also a tiny ADE20K segmentation model"
    )
    family = parser.add_mutually_exclusive_group()
    for flag, name in FAMILY_FLAGS.items():
        family.add_argument(flag, action="store_true", help=f"a tiny {name} model instead")
    variant = parser.add_mutually_exclusive_group()
    for flag, (_, name) in VARIANT_FLAGS.items():
        variant.add_argument(flag, action="store_true", help=f"with --flux: {name}")
    parser.add_argument("--plus", action="store_true", help="with --qwen-edit: Edit-Plus")
    parser.add_argument(
        "--redux", action="store_true", help="with --flux: also a tiny FLUX.1-Redux in DIR/redux"
    )
    parser.set_defaults(handler=tiny_model)


# The flow-matching families (pipeline/models/tiny_families/), one flag each.
FAMILY_FLAGS = {
    "--flux": "Flux.1 dev",
    "--zimage": "Z-Image",
    "--qwen-image": "Qwen-Image",
    "--qwen-edit": "Qwen-Image-Edit",
    "--flux2-klein": "Flux.2 klein",
}
VARIANT_FLAGS = {
    "--schnell": ("schnell", "Flux.1 schnell"),
    "--kontext": ("kontext", "Flux.1 Kontext"),
    "--fill": ("fill", "Flux.1 Fill (384-channel inpainting)"),
}
# The extra models written beside an SD model: each a flag and a write_tiny_config option.
CONTROL_OPTIONS = ("controlnet", "ip_adapter", "depth", "pose", "segmentation")
SD_ONLY = ("xl", "inpaint", "single_file", *CONTROL_OPTIONS)


def tiny_model(args: argparse.Namespace) -> int:
    from pipeline.families.sd_tiny import write_tiny_model

    family = next((f for f in FAMILY_FLAGS if getattr(args, _dest(f))), None)
    check_family_flags(args, family)
    if family:
        return write_family_model(args, family)

    path = write_tiny_model(args.dir, xl=args.xl, inpaint=args.inpaint)
    kind = "SDXL" if args.xl else "SD 1.x"
    print(f"wrote a tiny {kind}{' inpainting' if args.inpaint else ''} model to {path}")
    if args.single_file:
        from pipeline.models.single_file import export_folder

        checkpoint = export_folder(path, path / "model.safetensors")
        print(f"and its single-file checkpoint to {checkpoint}")
    if any(getattr(args, option) for option in CONTROL_OPTIONS):
        write_control_files(args, path)
    return 0


def write_control_files(args: argparse.Namespace, path: Path) -> None:
    """The tiny ControlNet / IP-Adapter / depth, pose, segmentation models beside the model, and
    DIR/config.toml naming them all."""
    from bot.cli.common import CliError
    from pipeline.families import sd_tiny_control as tiny_control

    if args.inpaint and args.controlnet:
        raise CliError("--controlnet needs a 4-channel model: leave out --inpaint")
    if args.controlnet:
        tiny_control.write_tiny_controlnet(path, path / "controlnet")
    if args.ip_adapter:
        tiny_control.write_tiny_ip_adapter(path, path / "ip_adapter")
    if args.depth:
        tiny_control.write_tiny_depth(path / "depth")
    if args.pose:
        tiny_control.write_tiny_pose(path / "pose")
        tiny_control.write_tiny_person_detector(path / "pose_detector")
    if args.segmentation:
        tiny_control.write_tiny_segmentation(path / "segmentation")
    chosen = {option: getattr(args, option) for option in CONTROL_OPTIONS}
    config = tiny_control.write_tiny_config(path, xl=args.xl, **chosen)
    print(f"and its ControlNet/IP-Adapter files, and {config}")


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def check_family_flags(args: argparse.Namespace, family: str | None) -> None:
    """One line for a variant without its family, or an SD option with a new family."""
    from bot.cli.common import CliError

    variant = next((f for f in VARIANT_FLAGS if getattr(args, _dest(f))), None)
    if variant and family != "--flux":
        raise CliError(f"{variant} is a Flux.1 variant: add --flux")
    if args.plus and family != "--qwen-edit":
        raise CliError("--plus is a Qwen-Image-Edit variant: add --qwen-edit")
    if args.redux and family != "--flux":
        raise CliError("--redux is Flux.1's reference-image model: add --flux")
    sd_options = [f"--{o.replace('_', '-')}" for o in SD_ONLY if getattr(args, o)]
    if family and sd_options:
        what = "is an SD option" if len(sd_options) == 1 else "are SD options"
        raise CliError(f"{', '.join(sd_options)} {what}: leave it out with {family}")


def write_family_model(args: argparse.Namespace, family: str) -> int:
    """A tiny Flux.1 / Z-Image / Qwen-Image / Flux.2 klein model (diffusers folder)."""
    from pipeline.models import tiny_families

    name = FAMILY_FLAGS[family]
    if family == "--flux":
        variant = next((v for f, v in VARIANT_FLAGS.items() if getattr(args, _dest(f))), None)
        path = tiny_families.write_tiny_flux(args.dir, variant=variant[0] if variant else "dev")
        name = variant[1] if variant else name
        if args.redux:
            redux = tiny_families.write_tiny_flux_redux(Path(args.dir) / "redux")
            print(f"and a tiny FLUX.1-Redux model to {redux}")
    elif family == "--zimage":
        from pipeline.families.zimage_tiny import write_tiny_zimage

        path = write_tiny_zimage(args.dir)
    elif family == "--flux2-klein":
        from pipeline.families.flux2_klein_tiny import write_tiny_flux2_klein

        path = write_tiny_flux2_klein(args.dir)
    else:
        from pipeline.families.qwen_image_tiny import write_tiny_qwen_image

        edit = "edit-plus" if args.plus else "edit"
        variant = "image" if family == "--qwen-image" else edit
        path = write_tiny_qwen_image(args.dir, variant=variant)
        name += "-Plus" if args.plus else ""
    print(f"wrote a tiny {name} model to {path}")
    if family == "--qwen-edit":
        print(
            "(load it with processor=pipeline.models.qwen_edit.load_qwen_processor(DIR/processor))"
        )
    return 0
