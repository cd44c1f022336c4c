"""The bot's durable state in SQLite (being split into sections; see queue.py)."""

from bot.store.queue import *  # noqa: F403
