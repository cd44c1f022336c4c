"""Edits of one Discord message, in order, spaced out, the newest state winning.

A progress message gets edits from several places (queue position, "Starting…",
steps, "Paused"). Sent as independent requests they can overtake each other, and
a stale "Queued — position 3" could land after "Starting…". Each message gets
one :class:`MessageEditor`: one edit in flight at a time, at most one per
``interval`` seconds (Discord's per-route rate limits, see DISCORD.md), and a new
state replaces any state not yet sent, so a burst of updates costs one edit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import discord

log = logging.getLogger("sdbot.edits")

EditCall = Callable[[], Awaitable[object]]


def http_error_text(exc: discord.HTTPException) -> str:
    """'PATCH /api/v10/channels/1/messages/2 -> 404 (10008) Unknown Message': for logs."""
    response = getattr(exc, "response", None)
    method = getattr(response, "method", "?")
    url = getattr(response, "url", None)
    route = getattr(url, "path", None) or str(url or "?")
    return f"{method} {route} -> {exc.status} ({exc.code}) {exc.text or ''}".strip()


class MessageEditor:
    """Serialises the edits of one message; ``submit`` never waits on Discord."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._pending: EditCall | None = None
        self._task: asyncio.Task | None = None
        self._last_sent = float("-inf")
        self._closed = False
        self._in_call = False
        self.sent = 0  # edits actually sent (tests and benchmarks read it)
        self.dropped = 0  # states replaced by a newer one before they were sent

    def submit(self, call: EditCall) -> None:
        """Send ``call()`` (an edit) once the previous one is done and the interval passed;
        a newer submit before then replaces it."""
        if self._closed:
            return
        if self._pending is not None:
            self.dropped += 1
        self._pending = call
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="sdbot-message-edit")

    async def _run(self) -> None:
        while self._pending is not None and not self._closed:
            wait = self._last_sent + self.interval - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
                if self._closed or self._pending is None:
                    return
            call, self._pending = self._pending, None
            self.sent += 1
            self._in_call = True
            try:
                await call()
            except Exception:  # noqa: BLE001 - the caller's call logs its own HTTP errors
                log.exception("a message edit failed")
            finally:
                self._in_call = False
                # Counted from when Discord took it (a 429's retry included): accepted edits
                # are at least ``interval`` apart.
                self._last_sent = self.clock()

    async def close(self) -> None:
        """Drop what is not sent yet and wait for the edit in flight: afterwards nothing
        from this editor can land (the result or final status goes next)."""
        self._closed = True
        self._pending = None
        task = self._task
        if task is not None and not task.done():
            if task is asyncio.current_task():
                return
            if not self._in_call:
                task.cancel()  # only waiting for the interval: nothing is in flight
            await asyncio.gather(task, return_exceptions=True)
