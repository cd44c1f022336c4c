"""The bot's one SQLite connection, used from one thread so the event loop never blocks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import sqlite_utils

T = TypeVar("T")


class DbThread:
    """The bot's database thread: ``await db.call(store.get_job, job_id)``."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db
        # One thread for this connection: SQLite calls never block the event loop.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdbot-bot-db")

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(db, *args, **kwargs)`` on the bot's database thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, partial(fn, self.db, *args, **kwargs))

    def release(self) -> None:
        """Let the database thread finish (the launcher closes the connection)."""
        self._thread.shutdown(wait=True)


def discord_id(value: int | None) -> str | None:
    """Discord ids (guild, channel) are stored as text; None stays None."""
    return None if value is None else str(value)
