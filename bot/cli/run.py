"""`sdbot run`: the Discord bot (reads config.toml and DISCORD_TOKEN)."""

from __future__ import annotations

import argparse

from bot.cli.common import command_config


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("run", help="run the Discord bot")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from bot.launcher import run_bot

    return run_bot(command_config(args))
