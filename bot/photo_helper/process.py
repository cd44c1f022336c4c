"""Photo questions the bot must answer before queueing, asked of a helper process.

"Is there a face in this photo?" (`/inpaint keep:face`) needs OpenCV, which the
bot process must never load (it stays small and torch/cv2-free). So such work
runs in one spawned helper process, started on first use and kept for the next
ones; the child imports `cv2`, the bot does not. `run(fn, *args)` runs any
picklable function there (e.g. `bot.photo_helper.work`); its result must unpickle
without heavy imports. A stuck or crashed child is replaced and the member is
told to try again.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from bot.errors import UserError
from bot.photo_helper.work import count_faces_in

log = logging.getLogger(__name__)

T = TypeVar("T")
NO_FACE = "no face found in the photo; attach a mask instead"


class FaceProbe:
    """One lazily started helper process that counts faces."""

    def __init__(self, timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s
        self._executor: ProcessPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], *args: Any, timeout_s: float | None = None) -> T:
        """``fn(*args)`` in the helper process; UserError when it hangs or dies."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool(), fn, *args)
        try:
            return await asyncio.wait_for(future, timeout_s or self.timeout_s)
        except (asyncio.TimeoutError, BrokenProcessPool):
            log.exception("photo helper failed on %s; restarting it", fn.__name__)
            self.close()
            raise UserError("photo checks are not responding right now; try again") from None

    async def count_faces(self, png: bytes, max_pixels: int) -> int:
        return await self.run(count_faces_in, png, max_pixels)

    async def require_face(self, png: bytes, max_pixels: int) -> None:
        if await self.count_faces(png, max_pixels) == 0:
            raise UserError(NO_FACE)

    def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            # A stuck detection must not hold the bot's shutdown: stop the child outright.
            processes = list((getattr(executor, "_processes", None) or {}).values())
            executor.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # spawn, not fork: a forked child would share the bot's event loop and sockets.
            context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(max_workers=1, mp_context=context)
        return self._executor
