"""A pacer in front of discord.py's HTTP client: at most `per_second` requests start
in any one second, below Discord's global limit of 50 per second per bot.

discord.py keeps to each route's bucket (it reads the `X-RateLimit-*` headers), but it
has no global limit of its own: it only reacts to a global 429, and requests already
past its gate still go out. After a restart the bot posts every missed result,
requeued jobs' progress and new jobs' messages at once, and a burst like that got 80
global 429s in `bench/bench_discord_load.py`. Each is an invalid request on the way to
Discord's ban (10,000 in 10 minutes), so the bot paces itself instead.

Interaction callbacks (`/interactions/...`) are exempt, as Discord exempts them: they
must answer within 3 s and never wait behind a burst of edits.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

DISCORD_GLOBAL_PER_SECOND = 50  # https://discord.com/developers/docs/topics/rate-limits
PER_SECOND = 45  # a margin for clocks that differ and requests of other processes
EXEMPT_PREFIXES = ("/interactions/",)


class GlobalPacer:
    """A sliding one-second window: a request waits until fewer than `per_second` have
    started in the last second."""

    def __init__(self, per_second: int = PER_SECOND, clock=time.monotonic) -> None:
        self.per_second = per_second
        self._clock = clock
        self._starts: collections.deque[float] = collections.deque()
        self._lock = asyncio.Lock()
        self.waited = 0  # requests that had to wait (for tests and logs)

    async def wait(self) -> None:
        async with self._lock:  # first come, first served
            while True:
                now = self._clock()
                while self._starts and now - self._starts[0] >= 1.0:
                    self._starts.popleft()
                if len(self._starts) < self.per_second:
                    self._starts.append(now)
                    return
                self.waited += 1
                await asyncio.sleep(1.0 - (now - self._starts[0]) + 0.001)


def pace(http: Any, pacer: GlobalPacer | None = None) -> GlobalPacer:
    """Make every request of discord.py's `HTTPClient` wait for the pacer first."""
    pacer = pacer or GlobalPacer()
    original = http.request

    async def request(route: Any, **kwargs: Any) -> Any:
        if not str(getattr(route, "path", "")).startswith(EXEMPT_PREFIXES):
            await pacer.wait()
        return await original(route, **kwargs)

    http.request = request
    return pacer
