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
    parser.set_defaults(handler=tiny_model)


def tiny_model(args: argparse.Namespace) -> int:
    from pipeline.models.tiny import write_tiny_model

    path = write_tiny_model(args.dir, xl=args.xl, inpaint=args.inpaint)
    kind = "SDXL" if args.xl else "SD 1.x"
    print(f"wrote a tiny {kind}{' inpainting' if args.inpaint else ''} model to {path}")
    if args.single_file:
        from pipeline.models.single_file import export_folder

        checkpoint = export_folder(path, path / "model.safetensors")
        print(f"and its single-file checkpoint to {checkpoint}")
    return 0
