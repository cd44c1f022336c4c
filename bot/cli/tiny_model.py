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
    parser.set_defaults(handler=tiny_model)


def tiny_model(args: argparse.Namespace) -> int:
    from pipeline.families.sd_tiny import write_tiny_model

    path = write_tiny_model(args.dir, xl=args.xl, inpaint=args.inpaint)
    kind = "SDXL" if args.xl else "SD 1.x"
    print(f"wrote a tiny {kind}{' inpainting' if args.inpaint else ''} model to {path}")
    if args.single_file:
        from pipeline.models.single_file import export_folder

        checkpoint = export_folder(path, path / "model.safetensors")
        print(f"and its single-file checkpoint to {checkpoint}")
    if args.controlnet or args.ip_adapter or args.depth or args.pose or args.segmentation:
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
    config = tiny_control.write_tiny_config(
        path,
        xl=args.xl,
        controlnet=args.controlnet,
        ip_adapter=args.ip_adapter,
        depth=args.depth,
        pose=args.pose,
        segmentation=args.segmentation,
    )
    print(f"and its ControlNet/IP-Adapter files, and {config}")
