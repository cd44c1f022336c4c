"""`sdbot train NAME PHOTO …`: one personal model, registered in the database."""

from __future__ import annotations

import argparse
from pathlib import Path

from bot.cli.common import command_config


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train a personal model offline")
    parser.add_argument("name")
    parser.add_argument("photos", nargs="*", type=Path)
    parser.add_argument("--zip", type=Path, help="a .zip of photos")
    parser.add_argument("--method", choices=["lora", "loha", "lokr"], default="lora")
    parser.add_argument("--steps", type=int, default=0, help="0: about 100 per photo")
    parser.add_argument("--subject", default="person", help="what the photos show")
    parser.add_argument("--user", default="cli", help="member id that owns the model")
    parser.add_argument("--model", default="default")
    parser.add_argument("--resolution", type=int, default=None)
    parser.set_defaults(handler=train)


def train(args: argparse.Namespace) -> int:
    from bot.cli.offline_train import train_offline

    return train_offline(args, command_config(args, model=args.model))
