"""`sdbot doctor`: what works and what doesn't on this machine."""

from __future__ import annotations

import argparse

from bot.cli.common import command_config


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("doctor", help="check GPU, models, database and token")
    parser.set_defaults(handler=doctor)


def doctor(args: argparse.Namespace) -> int:
    from pipeline.workers.doctor import run_doctor

    return run_doctor(command_config(args))
