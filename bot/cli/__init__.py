"""`sdbot`: run the bot, or do one job offline.

    sdbot run                     the Discord bot (reads config.toml and DISCORD_TOKEN)
    sdbot generate PROMPT …       one image job, written as PNGs with infotext
    sdbot edit IMAGE INSTRUCTION  one /edit job: the person measured, redrawn when lost
    sdbot train NAME PHOTO …      one personal model, registered in the database
    sdbot tiny-model DIR          a tiny random-weight model for tests and demos
    sdbot doctor                  what works and what doesn't on this machine
    sdbot doctor --download [M]   fetch the configured Hub models ahead of time

One module per command (`bot/cli/<command>.py`, each with `add_command` and its
handler); this package lives in bot/ because `run` and `train` need the bot's store.
The CLI may import both layers, and nothing else imports it. Everything that touches
torch is imported inside the command that needs it, so `sdbot run` keeps the bot
process free of torch.
"""

from __future__ import annotations

import argparse
import logging
import sys

from bot.cli import doctor, edit, generate, run, tiny_model, train
from bot.cli.common import EXIT_USAGE, CliError
from pipeline.contract.config import ConfigError
from pipeline.contract.jobs import JobError

__all__ = ["CliError", "main"]

# In the order `sdbot --help` lists them.
COMMANDS = (run, generate, edit, tiny_model, doctor, train)


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
    for command in COMMANDS:
        command.add_command(commands)
    return parser
