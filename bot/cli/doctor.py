"""`sdbot doctor`: what works and what doesn't on this machine; `--download [MODEL]`
fetches the configured Hub models' files ahead of time instead."""

from __future__ import annotations

import argparse

from bot.cli.common import command_config


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("doctor", help="check GPU, models, database and token")
    parser.add_argument(
        "--download",
        nargs="?",
        const="",
        default=None,
        metavar="MODEL",
        help="download every configured Hub model (or MODEL) into the Hugging Face cache, "
        "with progress; resumable: run it again after an interruption",
    )
    parser.set_defaults(handler=doctor)


def doctor(args: argparse.Namespace) -> int:
    if args.download is not None:
        from pipeline.workers.doctor import download_models

        return download_models(command_config(args), args.download)
    from pipeline.workers.doctor import run_doctor

    return run_doctor(command_config(args))
