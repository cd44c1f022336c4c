"""`sdbot`: the command line (being split into one module per command)."""

from bot.cli.generate import main

__all__ = ["main"]
