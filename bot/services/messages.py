"""A job's messages in its channel, Midjourney style, fed by the dispatcher's events.

- an ephemeral "Queued — position N" answer to the member's command (see jobs.py);
- one public progress message (step n/N, preview, ETA, Cancel), edited at most
  every `discord.progress_interval` seconds, deleted once the result is posted;
- the result: a NEW channel message (never through the 15-minute interaction
  token) mentioning the member, with the PNGs and persistent buttons.
Both message ids are stored on the job row, so after a restart the same progress
message is edited and the result is posted exactly once.

`MessageBoards` routes each event to the board of its job's kind (generation's
`JobMessages`, training's `TrainingMessages`) and keeps the "position N" of waiting
jobs fresh.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import discord
import sqlite_utils

from bot import store
from bot.plumbing.message_edits import MessageEditor, http_error_text
from bot.services.database import DbThread
from bot.services.personal import register_trained_lora, validation_summary
from bot.services.training import training_metrics
from bot.views import render
from bot.views.buttons import progress_view, result_view
from pipeline.contract.blobs import BlobError, BlobStore
from pipeline.contract.config import Config
from pipeline.contract.jobs import Cancelled, Done, Event, Failed, Paused, Progress, Started

log = logging.getLogger("sdbot")

MISSED_RESULTS_WINDOW_S = 24 * 3600  # results finished while the bot was down get posted
# message_id of a job whose result the channel refused for good (403): never retried.
UNDELIVERABLE = "refused"
POSITIONS_SHOWN = 5  # only the first few waiting jobs get "position N" updates
Board = TypeVar("Board", bound="JobMessages")


class MessageBoards:
    """Every kind of job's messages; the dispatcher's `on_event` lands here."""

    def __init__(self, config: Config, db: DbThread) -> None:
        self.config = config
        self.db = db
        self.boards: list[JobMessages] = []  # generation's, training's…
        self._positions_task: asyncio.Task | None = None
        self._stopped = False

    def add(self, board: Board) -> Board:
        """Route the events of ``board.kind`` jobs to ``board``."""
        self.boards = [b for b in self.boards if b.kind != board.kind] + [board]
        return board

    def of(self, kind: str) -> JobMessages:
        """The board that posts ``kind`` jobs' messages."""
        return next(b for b in self.boards if b.kind == kind)

    async def deliver_missed(self) -> None:
        """Every board's results that finished while the bot was down, posted once."""
        for board in self.boards:
            await board.deliver_missed()

    async def on_job_event(self, row: dict, event: Event) -> None:
        board = next((b for b in self.boards if b.kind == row["kind"]), None)
        if board is not None:
            await board.on_event(row, event)
        if isinstance(event, (Started, Cancelled)):
            self._refresh_positions_soon()

    async def stop(self) -> None:
        """The bot is closing: no position refresh may start on a closed database."""
        task, self._positions_task = self._positions_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._stopped = True

    def _refresh_positions_soon(self) -> None:
        """A job left the queue: the others moved up. One refresh at a time, at most one
        per progress interval, so a busy queue cannot flood Discord with edits."""
        if self._stopped:
            return
        if self._positions_task is None or self._positions_task.done():
            self._positions_task = asyncio.create_task(self._refresh_positions())

    async def _refresh_positions(self) -> None:
        await asyncio.sleep(self.config.discord.progress_interval)
        try:
            positions = await self.db.call(store.queue_positions)
            for board in self.boards:
                await board.refresh_positions(positions)
        except Exception:  # noqa: BLE001 - a cosmetic update must never hurt the queue
            log.exception("could not refresh queue positions")


@dataclass
class _Tracked:
    """What the bot remembers about one job's messages while it runs."""

    progress_id: int | None = None
    started_at: float | None = None
    # Edits of the progress message, one at a time, in order, newest state winning.
    editor: MessageEditor | None = None
    waiting: bool = True  # in the queue (again, after a pause or retry): positions apply
    finished: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class JobMessages:
    """Turns a generation job's events into its progress and result messages."""

    kind = "generate"  # the jobs whose messages this posts

    def __init__(
        self,
        client: discord.Client,
        *,
        config: Config,
        db: DbThread,
        blobs: BlobStore,
        safety: Any = None,
    ) -> None:
        self.client = client  # posts and edits in channels known by id alone
        self.config = config
        self.db = db
        self.blobs = blobs
        self.safety = safety  # bot.services.safety.SafetyGate: the NSFW policy of results
        self.jobs: dict[str, _Tracked] = {}
        self.shown_positions: dict[str, int] = {}  # job id → position its message shows
        self.upload_limits: dict[str, int] = {}  # job id → the interaction's upload limit
        # Jobs whose outcome was handled, so a late `announce` posts nothing (bounded).
        self.finished: OrderedDict[str, None] = OrderedDict()

    def _tracked(self, row: dict) -> _Tracked:
        tracked = self.jobs.setdefault(row["id"], _Tracked())
        if tracked.progress_id is None and row.get("progress_message_id"):
            tracked.progress_id = int(row["progress_message_id"])  # posted before a restart
        return tracked

    def _channel(self, row: dict) -> discord.PartialMessageable:
        # Partial: works from the ids alone, before (or without) the guild cache.
        guild_id = int(row["guild_id"]) if row.get("guild_id") else None
        return self.client.get_partial_messageable(int(row["channel_id"]), guild_id=guild_id)

    async def announce(self, row: dict, position: int | None) -> None:
        """Post the public progress message of a job just queued."""
        tracked = self._tracked(row)
        async with tracked.lock:
            if tracked.finished or row["id"] in self.finished or tracked.progress_id is not None:
                return  # the job already ran (fast worker) or was announced
            text = render.queued_text(row["user_id"], row["spec"], position)
            if position:
                self.shown_positions[row["id"]] = position
            # No ping here: the member just asked; the result (or a failure) pings them.
            message = await self._channel(row).send(
                text, view=progress_view(row["id"]), allowed_mentions=discord.AllowedMentions.none()
            )
            tracked.progress_id = message.id
        await self.db.call(store.set_job_messages, row["id"], progress_message_id=str(message.id))

    async def refresh_positions(self, positions: dict[str, int]) -> None:
        """Edit the "Queued — position N" of waiting jobs whose place in line moved."""
        for job_id, tracked in list(self.jobs.items()):
            position = positions.get(job_id)
            shown = self.shown_positions.get(job_id)
            if position is None or shown is None or position == shown:
                continue
            if tracked.finished or not tracked.waiting or position > POSITIONS_SHOWN:
                continue
            row = await self.db.call(store.get_job, job_id)
            if row is None or row["status"] != store.JobStatus.QUEUED.value:
                continue
            if tracked.finished or not tracked.waiting:
                continue  # it started while we read the row: "Starting…" is newer
            self.shown_positions[job_id] = position
            text = render.queued_text(row["user_id"], row["spec"], position)
            self._schedule_edit(row, tracked, text)

    async def on_event(self, row: dict, event: Event) -> None:
        if not isinstance(event, Progress):
            self.shown_positions.pop(row["id"], None)  # it left the queue, for now at least
        tracked = self._tracked(row)
        if isinstance(event, (Started, Progress)):
            tracked.waiting = False
        elif isinstance(event, (Paused, Failed)):
            tracked.waiting = row["status"] == store.JobStatus.QUEUED.value
        if isinstance(event, Started):
            tracked.started_at = time.monotonic()
            self._schedule_edit(
                row,
                tracked,
                render.progress_text(
                    row["user_id"], row["spec"], 0, row["spec"].get("steps", 0), None, "Starting…"
                ),
            )
        elif isinstance(event, Progress):
            self._on_progress(row, tracked, event)
        elif isinstance(event, Done):
            await self._finish(row, tracked, self._post_result)
        elif isinstance(event, Failed):
            await self._on_failed(row, tracked, event)
        elif isinstance(event, Cancelled):
            await self._finish(row, tracked, partial(self._final_status, status="Cancelled."))
        elif isinstance(event, Paused):
            self._schedule_edit(
                row,
                tracked,
                render.status_text(
                    row["user_id"], row["spec"], f"Paused at step {event.step}; back in the queue."
                ),
            )

    def _on_progress(self, row: dict, tracked: _Tracked, event: Progress) -> None:
        # No throttle here: the message's editor sends the newest state once per interval.
        if event.message:  # before the steps: the worker downloads the model
            status = f"{event.message[:1].upper()}{event.message[1:]}…"
            text = render.status_text(row["user_id"], row["spec"], status)
            self._schedule_edit(row, tracked, text)
            return
        now = time.monotonic()
        elapsed = now - (tracked.started_at or now)
        eta = render.eta_seconds(elapsed, event.step, event.total)
        note = f"loss {event.loss:.4f}" if event.loss is not None else ""
        text = render.progress_text(row["user_id"], row["spec"], event.step, event.total, eta, note)
        self._schedule_edit(row, tracked, text, event.preview)

    async def _on_failed(self, row: dict, tracked: _Tracked, event: Failed) -> None:
        if row["status"] == store.JobStatus.QUEUED.value:  # retried: still waiting
            text = render.status_text(
                row["user_id"], row["spec"], f"Retrying (attempt {row['attempts'] + 1})…"
            )
            self._schedule_edit(row, tracked, text)
            return
        await self._finish(row, tracked, partial(self._post_failure, message=event.message))

    def _schedule_edit(
        self, row: dict, tracked: _Tracked, text: str, preview: bytes | None = None
    ) -> None:
        """Edit the progress message in the background: the dispatcher never waits on
        Discord for a progress update."""
        if tracked.progress_id is None or tracked.finished:
            return
        if tracked.editor is None:
            tracked.editor = MessageEditor(self.config.discord.progress_interval)
        message = self._channel(row).get_partial_message(tracked.progress_id)
        job_id = row["id"]

        async def edit() -> None:
            # Built when sent, not when scheduled: a replaced state costs nothing.
            files = [discord.File(io.BytesIO(preview), "preview.jpg")] if preview else []
            call = message.edit(content=text, attachments=files, view=progress_view(job_id))
            await self._quietly(call, job_id)

        tracked.editor.submit(edit)

    async def _delete_progress(self, row: dict, tracked: _Tracked) -> None:
        """Delete the progress message (the result or failure is up) and forget its id, so
        neither a restart nor /forget asks Discord to delete it again (a 404 each)."""
        if tracked.progress_id is None:
            return
        progress = self._channel(row).get_partial_message(tracked.progress_id)
        if await self._quietly(progress.delete(), row["id"]):
            tracked.progress_id = None
            await self.db.call(store.set_job_messages, row["id"], progress_message_id="")

    async def _quietly(self, call: Awaitable[Any], job_id: str) -> bool:
        """Await a progress edit or delete; an HTTP error is logged (with its route) and
        swallowed: a cosmetic update must not stop the job's result. True if it worked."""
        try:
            await call
            return True
        except discord.NotFound as exc:
            log.warning("progress message of job %s is gone: %s", job_id, http_error_text(exc))
            self.jobs.get(job_id, _Tracked()).progress_id = None  # someone deleted it
        except discord.HTTPException as exc:
            log.warning("could not update the progress of job %s: %s", job_id, http_error_text(exc))
        return False

    async def _finish(
        self, row: dict, tracked: _Tracked, then: Callable[[dict, _Tracked], Awaitable[None]]
    ) -> None:
        async with tracked.lock:
            tracked.finished = True
            if tracked.editor is not None:
                await tracked.editor.close()  # no progress edit may land after the result
            try:
                await then(row, tracked)
            finally:
                self.jobs.pop(row["id"], None)
                self.upload_limits.pop(row["id"], None)
                self.finished[row["id"]] = None
                while len(self.finished) > 10_000:
                    self.finished.popitem(last=False)

    async def _final_status(self, row: dict, tracked: _Tracked, status: str) -> None:
        if tracked.progress_id is None:
            return
        text = render.status_text(row["user_id"], row["spec"], status)
        message = self._channel(row).get_partial_message(tracked.progress_id)
        await self._quietly(message.edit(content=text, attachments=[], view=None), row["id"])

    async def _post_failure(self, row: dict, tracked: _Tracked, message: str) -> None:
        """A new message (edits notify nobody) in place of the progress message."""
        text = render.status_text(row["user_id"], row["spec"], f"Failed: {message}")
        try:
            await self._channel(row).send(text)
        except discord.HTTPException as exc:
            log.warning(
                "could not report the failure of job %s: %s", row["id"], http_error_text(exc)
            )
            await self._final_status(row, tracked, f"Failed: {render.truncate(message, 1500)}")
            return
        await self._delete_progress(row, tracked)

    async def _post_result(self, row: dict, tracked: _Tracked) -> None:
        if row.get("message_id"):
            return  # posted before a restart: exactly once
        images = (row.get("result") or {}).get("images") or []
        try:
            pngs = await asyncio.to_thread(self._pngs, row, images)
        except BlobError as exc:
            await self._final_status(row, tracked, f"Failed: {exc}")
            return
        verdict = await self.safety.verdict(row, images) if self.safety else None
        if verdict is not None:  # spoiler names by each image's own index, before any is taken out
            names = verdict.filenames([name for name, _ in pngs])
            pngs = [(name, data) for name, (_, data) in zip(names, pngs)]
        if verdict is not None and verdict.blocked:  # the server's NSFW policy
            withheld = [png for i, png in enumerate(pngs) if i in verdict.private]
            sent = await self.safety.send_blocked(row, verdict, withheld)
            pngs = [png for i, png in enumerate(pngs) if i not in verdict.blocked]
            if not pngs:
                await self._post_withheld(row, tracked, verdict, len(images), sent)
                return
        limit = self.upload_limits.get(row["id"]) or self._guild_limit(row)
        uploads, note = await asyncio.to_thread(render.fit_uploads, pngs, limit)
        if verdict is not None:
            note = " ".join(n for n in (verdict.note(len(images)), note) if n)
        scores = render.edit_scores(row["spec"], images, self.config.edit.min_identity)
        note = "\n".join(n for n in (scores, note) if n)
        try:
            message = await self._channel(row).send(
                render.result_text(row["user_id"], row["id"], row["spec"], images, note),
                files=[discord.File(io.BytesIO(u.data), u.filename) for u in uploads],
                view=result_view(row["id"], len(images), compare=row["spec"].get("mode") == "edit"),
            )
        except discord.HTTPException as exc:
            # Never silently: the member sees why; the next start tries again (message_id
            # stays empty, see deliver_missed).
            log.warning("could not post the result of job %s: %s", row["id"], http_error_text(exc))
            status = f"Done, but Discord refused the images ({exc.status}: {exc.text or exc})."
            await self._final_status(row, tracked, render.truncate(status, 500))
            if isinstance(exc, discord.Forbidden):
                # The bot lost its permissions here since the job was queued: a restart
                # would be refused the same way, so deliver_missed must not try again.
                await self.db.call(store.set_job_messages, row["id"], message_id=UNDELIVERABLE)
            return
        await self.db.call(store.set_job_messages, row["id"], message_id=str(message.id))
        await self._delete_progress(row, tracked)

    async def _post_withheld(
        self, row: dict, tracked: _Tracked, verdict: Any, total: int, sent: bool
    ) -> None:
        """Every image was blocked: a notice in the channel takes the result's place."""
        text = render.status_text(row["user_id"], row["spec"], verdict.note(total))
        if sent:
            text += "\nThe member received them privately."
        try:
            message = await self._channel(row).send(text)
        except discord.HTTPException as exc:
            log.warning("could not post the notice of job %s: %s", row["id"], exc)
            return
        await self.db.call(store.set_job_messages, row["id"], message_id=str(message.id))
        if tracked.progress_id is not None:
            progress = self._channel(row).get_partial_message(tracked.progress_id)
            await self._quietly(progress.delete(), row["id"])

    def _pngs(self, row: dict, images: list[dict]) -> list[tuple[str, bytes]]:
        return [
            (f"sdbot-{row['id']}-{image['seed']}.png", self.blobs.get(image["sha256"]))
            for image in images
        ]

    def _guild_limit(self, row: dict) -> int:
        guild = self.client.get_guild(int(row["guild_id"])) if row.get("guild_id") else None
        return guild.filesize_limit if guild is not None else render.DEFAULT_FILE_LIMIT

    async def _post_missed_result(self, row: dict, tracked: _Tracked) -> None:
        """The bot may have died between posting the result and saving its id: look in the
        channel first, so a restart never posts a result twice."""
        posted = await self._posted_before(row)
        if posted is None:
            await self._post_result(row, tracked)
            return
        await self.db.call(store.set_job_messages, row["id"], message_id=str(posted))
        await self._delete_progress(row, tracked)

    async def _posted_before(self, row: dict) -> int | None:
        """The id of this job's result among the channel's recent messages, if there."""
        me = getattr(self.client.user, "id", None)
        wanted = f"sdbot:info:{row['id']}"
        try:
            async for message in self._channel(row).history(limit=50):
                if message.author.id != me:
                    continue
                for action_row in message.components:
                    for child in getattr(action_row, "children", []):
                        if (getattr(child, "custom_id", None) or "").startswith(wanted):
                            return message.id
        except discord.HTTPException as exc:  # no history access: post, at worst twice
            log.warning("could not read the channel of job %s: %s", row["id"], http_error_text(exc))
        return None

    async def deliver_missed(self) -> None:
        """Post results of jobs that finished while the bot was not there to post them."""
        since = time.time() - MISSED_RESULTS_WINDOW_S
        rows = await self.db.call(store.unposted_results, since, self.kind)
        for row in rows:
            tracked = self._tracked(row)
            try:
                await self._finish(row, tracked, self._post_missed_result)
            except discord.HTTPException as exc:
                log.warning(
                    "could not post the missed result of job %s: %s",
                    row["id"],
                    http_error_text(exc),
                )


# -- training jobs --------------------------------------------------------------------------


class TrainingMessages(JobMessages):
    """A training job's progress and result messages; deletes its photos at the end."""

    kind = "train"

    async def on_event(self, row: dict, event: Event) -> None:
        over = isinstance(event, Done) or row["status"] in ("failed", "cancelled")
        if over and not (isinstance(event, Failed) and row["status"] == "queued"):
            # First: the member's photos go as soon as the job is over, before the
            # (slower, Discord-bound) message updates.
            await asyncio.to_thread(delete_photos, self.blobs, row["spec"])
        await super().on_event(row, event)

    async def _post_result(self, row: dict, tracked: _Tracked) -> None:
        if row.get("message_id"):
            return  # posted before a restart: exactly once
        result = row.get("result") or {}
        info = result.get("info") or {}
        spec = row["spec"]
        # Also here: a result delivered after a restart never went through on_event.
        await asyncio.to_thread(delete_photos, self.blobs, spec)
        try:
            record = await self.db.call(_register_once, self, row)
        except store.StoreError as exc:
            await self._final_status(row, tracked, f"Trained, but not saved: {exc}")
            return
        files, note = await self._sample_files(row, result.get("images") or [])
        text = render.training_result_text(
            row["user_id"], spec, record, validation_summary(info), info
        )
        if note:
            text = render.truncate(f"{text}\n{note}", 2000)
        message = await self._channel(row).send(text, files=files)
        await self.db.call(store.set_job_messages, row["id"], message_id=str(message.id))
        await self._delete_progress(row, tracked)

    async def _sample_files(self, row: dict, samples: list[dict]) -> tuple[list, str]:
        """The sample images as attachments, and a note: they are results like any other,
        so the server's NSFW policy applies (withheld, or spoilers, in a channel that is not
        age-restricted) and Discord's upload limits are kept."""
        if not samples:
            return [], ""
        base = row["spec"]["name"]
        names = [f"{base}-sample-{i + 1}.png" for i in range(len(samples))]
        stored = await asyncio.to_thread(self._pngs, row, samples)
        pngs = [(name, data) for name, (_, data) in zip(names, stored)]
        verdict = await self.safety.verdict(row, samples) if self.safety else None
        if verdict is not None and verdict.blocked:
            withheld = [png for i, png in enumerate(pngs) if i in verdict.private]
            await self.safety.send_blocked(row, verdict, withheld)
            pngs = [png for i, png in enumerate(pngs) if i not in verdict.blocked]
        elif verdict is not None:
            pngs = list(zip(verdict.filenames([name for name, _ in pngs]), (d for _, d in pngs)))
        limit = self.upload_limits.get(row["id"]) or self._guild_limit(row)
        uploads, note = await asyncio.to_thread(render.fit_uploads, pngs, limit)
        if verdict is not None:
            note = " ".join(n for n in (verdict.note(len(samples)), note) if n)
        return [discord.File(io.BytesIO(u.data), u.filename) for u in uploads], note


def _register_once(db: sqlite_utils.Database, board: TrainingMessages, row: dict) -> dict:
    """Register the trained file; a retried post (after a restart) finds it registered."""
    existing = store.lora_of_job(db, row["id"])
    if existing:
        return existing
    spec, result = row["spec"], row.get("result") or {}
    [file] = result["files"]
    info = result.get("info") or {}
    metrics = training_metrics(info)
    return register_trained_lora(
        db,
        board.blobs,
        board.config,
        owner_id=row["user_id"],
        guild_id=row.get("guild_id"),
        name=spec["name"],
        token=spec["token"],
        method=spec["method"],
        base_model=spec["model"],
        sha256=file["sha256"],
        metrics=metrics,
        job_id=row["id"],
    )


def delete_photos(blobs: BlobStore, spec: dict) -> None:
    for sha in [*spec.get("photos", ()), *spec.get("test_photos", ())]:
        blobs.delete(sha)
