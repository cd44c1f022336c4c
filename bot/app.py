"""The Discord bot: a `commands.Bot` with its dependencies injected by the launcher.

`SDBot` holds what every cog needs — config, SQLite store, blob store, worker pool,
dispatcher — plus the one path every job takes into the queue (`submit`) and out
to the channel (`JobMessages`, fed by the dispatcher's `on_event`).

Messages a job gets, Midjourney style:
- an ephemeral "Queued — position N" answer to the member's command;
- one public progress message (step n/N, preview, ETA, Cancel), edited at most
  every `discord.progress_interval` seconds, deleted once the result is posted;
- the result: a NEW channel message (never through the 15-minute interaction
  token) mentioning the member, with the PNGs and persistent buttons.
Both message ids are stored on the job row, so after a restart the same progress
message is edited and the result is posted exactly once.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import discord
import sqlite_utils
from discord.ext import commands

from bot import render, store
from bot.attachments import Photo, store_photos
from bot.cogs import EXTENSIONS
from bot.dispatcher import Dispatcher
from bot.errors import SDCommandTree, UserError
from bot.face_probe import FaceProbe
from bot.views import DYNAMIC_ITEMS, progress_view, result_view
from pipeline.contract.blobs import BlobError, BlobStore, sha256_hex
from pipeline.contract.config import Config
from pipeline.contract.jobs import (
    Cancelled,
    Done,
    Event,
    Failed,
    GenerateSpec,
    LoraRef,
    Paused,
    Progress,
    Started,
    spec_to_dict,
)
from pipeline.contract.pool import WorkerPool
from pipeline.contract.prompt_syntax import extract_loras

log = logging.getLogger("sdbot")

T = TypeVar("T")
OnJobEvent = Callable[[dict, Event], Awaitable[None]]
MISSED_RESULTS_WINDOW_S = 24 * 3600  # results finished while the bot was down get posted
POSITIONS_SHOWN = 20  # waiting jobs further back keep their first "position N"
LORA_TAG = ("<lora:", "<lyco:")


class SDBot(commands.Bot):
    def __init__(
        self,
        *,
        config: Config,
        db: sqlite_utils.Database,
        blobs: BlobStore,
        pool: WorkerPool,
        face_probe: FaceProbe | None = None,
    ) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            # Slash commands and buttons need no privileged intents, nor member lists.
            intents=discord.Intents(guilds=True),
            tree_cls=SDCommandTree,
            chunk_guilds_at_startup=False,
            member_cache_flags=discord.MemberCacheFlags.none(),
            max_messages=None,
            # A gap this long after the last GUILD_CREATE means "ready" (default 2 s).
            guild_ready_timeout=0.5,
            allowed_mentions=discord.AllowedMentions(everyone=False, roles=False, users=True),
        )
        self.config = config
        self.db = db
        self.blobs = blobs
        self.pool = pool
        self.face_probe = face_probe or FaceProbe()
        self.dispatcher = Dispatcher(
            config.storage.database, pool, blobs, config, on_event=self.on_job_event
        )
        self.message_boards: list[JobMessages] = []  # generation's, training's…
        self._positions_task: asyncio.Task | None = None
        self.messages = JobMessages(self)
        # Other kinds of jobs (training) register their own handler here.
        self.job_event_handlers: dict[str, OnJobEvent] = {"generate": self.messages.on_event}
        self.ready_event: asyncio.Event | None = None
        # One thread for this connection: SQLite calls never block the event loop.
        self._db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdbot-bot-db")
        self._first_ready = True
        self._stopped = False

    # -- start-up and shutdown ------------------------------------------------------------

    async def setup_hook(self) -> None:
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        self.add_dynamic_items(*DYNAMIC_ITEMS)
        await self.dispatcher.start()
        await self.sync_commands()

    async def sync_commands(self) -> None:
        """Guild commands appear at once; global ones can take up to an hour."""
        if not self.config.discord.guild_ids:
            await self.tree.sync()
            return
        for guild_id in self.config.discord.guild_ids:
            guild = discord.Object(guild_id)
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)

    async def on_ready(self) -> None:
        if self._first_ready:
            self._first_ready = False
            log.info("logged in as %s; serving %d guild(s)", self.user, len(self.guilds))
            guild_ids = {g.id for g in self.guilds} | set(self.config.discord.guild_ids)
            await self.db_call(register_server_loras, self.blobs, self.config, guild_ids)
            await self.messages.deliver_missed()
        if os.environ.get("SDBOT_DEBUG_MODULES"):
            report_heavy_modules()
        if self.ready_event is not None:
            self.ready_event.set()

    @property
    def stopping(self) -> bool:
        return self._stopped

    async def close(self) -> None:
        if not self._stopped:
            self._stopped = True
            await self.dispatcher.stop()
            self.face_probe.close()
        await super().close()

    def release(self) -> None:
        """After close(): let the database thread finish (the launcher closes the db)."""
        self._db_thread.shutdown(wait=True)

    # -- services for the cogs --------------------------------------------------------------

    async def db_call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(self.db, *args, **kwargs)`` on the bot's database thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_thread, partial(fn, self.db, *args, **kwargs))

    def is_admin(self, interaction: discord.Interaction) -> bool:
        """Manage Server (or Administrator), or the configured admin role."""
        permissions = interaction.permissions
        if permissions.administrator or permissions.manage_guild:
            return True
        role = self.config.discord.admin_role
        roles = getattr(interaction.user, "roles", [])
        return bool(role) and any(r.name == role for r in roles)

    async def resolve_loras(
        self, prompt: str, user_id: int, guild_id: int | None
    ) -> tuple[LoraRef, ...]:
        """`<lora:name:w>` tags → LoraRefs the member may use (own, shared, server)."""
        if not any(tag in prompt.lower() for tag in LORA_TAG):
            return ()
        _, tags = extract_loras(prompt, max_weight=self.config.limits.max_lora_weight)
        refs = []
        for name, weight in tags:
            row = await self.db_call(_find_lora_or_hint, name, str(user_id), _str(guild_id))
            refs.append(LoraRef(row["name"], row["sha256"], weight))
        return tuple(refs)

    async def check_queue_room(self, user_id: int) -> None:
        """Refuse early, before downloading photos, when the member's queue is full
        (`store.enqueue` checks again, atomically)."""
        cap = self.config.queue.max_queued_per_user
        if await self.db_call(store.queued_count, str(user_id)) >= cap:
            raise store.QueueFull(
                f"you already have {cap} jobs queued (the limit is {cap}); "
                "wait for one to finish or /cancel one"
            )

    async def submit(
        self, interaction: discord.Interaction, spec: GenerateSpec, photos: Sequence[Photo] = ()
    ) -> dict:
        """Queue a job for the member (the interaction must be deferred) and tell them.

        The spec is checked against the server's limits first; only then are the
        photos stored, so a refused request leaves nothing behind.
        """
        spec = spec.with_seed()
        spec.check(self.config.limits)
        if photos:
            await asyncio.to_thread(store_photos, self.blobs, list(photos))
        row = await self.db_call(
            store.enqueue,
            user_id=str(interaction.user.id),
            guild_id=_str(interaction.guild_id),
            channel_id=_str(interaction.channel_id),
            kind=spec.kind,
            spec=spec_to_dict(spec),
            batch_key=spec.batch_key(),
            max_attempts=self.config.workers.max_attempts,
            max_queued_per_user=self.config.queue.max_queued_per_user,
        )
        self.messages.upload_limits[row["id"]] = interaction.filesize_limit
        position = await self.db_call(store.queue_position, row["id"])
        await self.messages.announce(row, position)
        self.dispatcher.wake()
        where = f"position {position}" if position else "starting"
        await interaction.followup.send(
            f"Queued `{row['id']}` — {where}. The result will be posted in this channel.",
            ephemeral=True,
        )
        return row

    async def cancel_for(self, interaction: discord.Interaction, job_id: str) -> None:
        """Cancel for the member (their own jobs; admins: any)."""
        if not interaction.response.is_done():  # /cancel without a job deferred already
            await interaction.response.defer(ephemeral=True, thinking=True)
        previous = await self.dispatcher.cancel(
            job_id, str(interaction.user.id), admin=self.is_admin(interaction)
        )
        text = {
            store.JobStatus.QUEUED: f"Cancelled `{job_id}`.",
            store.JobStatus.RUNNING: f"Stopping `{job_id}`…",
        }.get(previous, f"`{job_id}` had already ended ({previous.value}).")
        await interaction.followup.send(text, ephemeral=True)

    # -- from the dispatcher ------------------------------------------------------------------

    async def on_job_event(self, row: dict, event: Event) -> None:
        handler = self.job_event_handlers.get(row["kind"])
        if handler is not None:
            await handler(row, event)
        if isinstance(event, (Started, Cancelled)):
            self._refresh_positions_soon()

    def _refresh_positions_soon(self) -> None:
        """A job left the queue: the others moved up. One refresh at a time, at most one
        per progress interval, so a busy queue cannot flood Discord with edits."""
        if self._positions_task is None or self._positions_task.done():
            self._positions_task = asyncio.create_task(self._refresh_positions())

    async def _refresh_positions(self) -> None:
        await asyncio.sleep(self.config.discord.progress_interval)
        try:
            positions = await self.db_call(store.queue_positions)
            for board in self.message_boards:
                await board.refresh_positions(positions)
        except Exception:  # noqa: BLE001 - a cosmetic update must never hurt the queue
            log.exception("could not refresh queue positions")


def report_heavy_modules() -> None:
    """Log whether this (the bot's) process loaded torch & co.: a hidden check for tests,
    switched on by the SDBOT_DEBUG_MODULES environment variable."""
    heavy = [m for m in ("torch", "diffusers", "transformers", "peft", "cv2") if m in sys.modules]
    log.warning("SDBOT_DEBUG_MODULES heavy modules in the bot process: %s", heavy or "none")


def _str(value: int | None) -> str | None:
    return None if value is None else str(value)


def _find_lora_or_hint(
    db: sqlite_utils.Database, name: str, user_id: str, guild_id: str | None
) -> dict:
    try:
        return store.find_lora(db, name, user_id=user_id, guild_id=guild_id)
    except store.LoraNotFound:
        from difflib import get_close_matches

        names = [row["name"] for row in store.list_loras(db, user_id, guild_id)]
        close = get_close_matches(name, names, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else " /lora list shows yours."
        raise UserError(f"LoRA '{name}' not found.{hint}") from None


# -- the server LoRA library ---------------------------------------------------------------


def register_server_loras(
    db: sqlite_utils.Database, blobs: BlobStore, config: Config, guild_ids: set[int]
) -> int:
    """Put each `*.safetensors` in `loras.dir` into the blob store (workers find LoRAs by
    sha256) and register it as each guild's library LoRA, named after the file.
    Files already registered (same sha) are skipped; returns how many were added."""
    folder = Path(config.lora_dir)
    if not folder.is_dir() or not guild_ids:
        return 0
    added = 0
    limit = config.loras.max_file_mb * 1024 * 1024
    for path in sorted(folder.glob("*.safetensors")):
        if path.stat().st_size > limit:
            log.warning("skipping %s: over loras.max_file_mb", path.name)
            continue
        data = path.read_bytes()
        sha = sha256_hex(data)
        blobs.put(data, ".safetensors")
        del data  # LoRA files are large; don't keep one alive through the loop
        added += sum(_register_one(db, path, sha, str(g)) for g in sorted(guild_ids))
    return added


def _register_one(db: sqlite_utils.Database, path: Path, sha: str, guild_id: str) -> bool:
    known = store.server_lora_by_sha(db, guild_id, sha)
    if known:
        return False
    try:
        store.add_lora(
            db,
            owner_id=None,
            guild_id=guild_id,
            name=path.stem,
            sha256=sha,
            size_bytes=path.stat().st_size,
            shared=True,
        )
    except store.StoreError as exc:  # a bad or duplicate name: the admin renames the file
        log.warning("server LoRA %s not registered: %s", path.name, exc)
        return False
    return True


# -- progress and result messages ------------------------------------------------------------


@dataclass
class _Tracked:
    """What the bot remembers about one job's messages while it runs."""

    progress_id: int | None = None
    started_at: float | None = None
    last_edit: float = 0.0
    edit: asyncio.Task | None = None
    finished: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class JobMessages:
    """Turns a generation job's events into its progress and result messages."""

    kind = "generate"  # the jobs whose messages this posts

    def __init__(self, bot: SDBot) -> None:
        self.bot = bot
        bot.message_boards.append(self)
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
        return self.bot.get_partial_messageable(int(row["channel_id"]), guild_id=guild_id)

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
        await self.bot.db_call(
            store.set_job_messages, row["id"], progress_message_id=str(message.id)
        )

    async def refresh_positions(self, positions: dict[str, int]) -> None:
        """Edit the "Queued — position N" of waiting jobs whose place in line moved."""
        for job_id, tracked in list(self.jobs.items()):
            position = positions.get(job_id)
            shown = self.shown_positions.get(job_id)
            if position is None or shown is None or position == shown:
                continue
            if tracked.finished or tracked.started_at is not None or position > POSITIONS_SHOWN:
                continue
            row = await self.bot.db_call(store.get_job, job_id)
            if row is None or row["status"] != store.JobStatus.QUEUED.value:
                continue
            self.shown_positions[job_id] = position
            text = render.queued_text(row["user_id"], row["spec"], position)
            self._schedule_edit(row, tracked, text)

    async def on_event(self, row: dict, event: Event) -> None:
        if not isinstance(event, Progress):
            self.shown_positions.pop(row["id"], None)  # it left the queue, for now at least
        tracked = self._tracked(row)
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
        now = time.monotonic()
        # Rate limits: one edit per message per interval, and never two in flight.
        if now - tracked.last_edit < self.bot.config.discord.progress_interval:
            return
        if tracked.edit is not None and not tracked.edit.done():
            return
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
        tracked.last_edit = time.monotonic()
        files = [discord.File(io.BytesIO(preview), "preview.jpg")] if preview else []
        message = self._channel(row).get_partial_message(tracked.progress_id)
        edit = message.edit(content=text, attachments=files, view=progress_view(row["id"]))
        tracked.edit = asyncio.create_task(self._quietly(edit, row["id"]))

    async def _quietly(self, call: Awaitable[Any], job_id: str) -> None:
        try:
            await call
        except discord.NotFound:
            self.jobs.get(job_id, _Tracked()).progress_id = None  # someone deleted it
        except discord.HTTPException as exc:
            log.warning("could not update the progress of job %s: %s", job_id, exc)

    async def _finish(
        self, row: dict, tracked: _Tracked, then: Callable[[dict, _Tracked], Awaitable[None]]
    ) -> None:
        async with tracked.lock:
            tracked.finished = True
            if tracked.edit is not None:
                await tracked.edit  # the last progress edit must not land after the result
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
            log.warning("could not report the failure of job %s: %s", row["id"], exc)
            await self._final_status(row, tracked, f"Failed: {render.truncate(message, 1500)}")
            return
        if tracked.progress_id is not None:
            progress = self._channel(row).get_partial_message(tracked.progress_id)
            await self._quietly(progress.delete(), row["id"])

    async def _post_result(self, row: dict, tracked: _Tracked) -> None:
        if row.get("message_id"):
            return  # posted before a restart: exactly once
        images = (row.get("result") or {}).get("images") or []
        try:
            pngs = await asyncio.to_thread(self._pngs, row, images)
        except BlobError as exc:
            await self._final_status(row, tracked, f"Failed: {exc}")
            return
        limit = self.upload_limits.get(row["id"]) or self._guild_limit(row)
        uploads, note = await asyncio.to_thread(render.fit_uploads, pngs, limit)
        try:
            message = await self._channel(row).send(
                render.result_text(row["user_id"], row["id"], row["spec"], images, note),
                files=[discord.File(io.BytesIO(u.data), u.filename) for u in uploads],
                view=result_view(row["id"], len(images)),
            )
        except discord.HTTPException as exc:
            # Never silently: the member sees why; the next start tries again (message_id
            # stays empty, see deliver_missed).
            log.warning("could not post the result of job %s: %s", row["id"], exc)
            status = f"Done, but Discord refused the images ({exc.status}: {exc.text or exc})."
            await self._final_status(row, tracked, render.truncate(status, 500))
            return
        await self.bot.db_call(store.set_job_messages, row["id"], message_id=str(message.id))
        if tracked.progress_id is not None:
            progress = self._channel(row).get_partial_message(tracked.progress_id)
            await self._quietly(progress.delete(), row["id"])

    def _pngs(self, row: dict, images: list[dict]) -> list[tuple[str, bytes]]:
        return [
            (f"sdbot-{row['id']}-{image['seed']}.png", self.bot.blobs.get(image["sha256"]))
            for image in images
        ]

    def _guild_limit(self, row: dict) -> int:
        guild = self.bot.get_guild(int(row["guild_id"])) if row.get("guild_id") else None
        return guild.filesize_limit if guild is not None else render.DEFAULT_FILE_LIMIT

    async def deliver_missed(self) -> None:
        """Post results of jobs that finished while the bot was not there to post them."""
        since = time.time() - MISSED_RESULTS_WINDOW_S
        rows = await self.bot.db_call(store.unposted_results, since, self.kind)
        for row in rows:
            tracked = self._tracked(row)
            try:
                await self._finish(row, tracked, self._post_result)
            except discord.HTTPException as exc:
                log.warning("could not post the missed result of job %s: %s", row["id"], exc)
