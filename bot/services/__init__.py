"""What the cogs use, built once by the launcher and handed to every cog.

Each service is a plain object with its dependencies passed in; `build_services`
wires them (the dispatcher's events go to the message boards, the job service
announces through each kind's board of messages). Cogs take a `Services` and never reach
through the Discord client for any of it: the client is only the connection.

- `database.DbThread`: the SQLite connection on its own thread (`await db.call(...)`);
- `messages`: progress and result messages (`JobMessages`, `TrainingMessages`,
  `MessageBoards`);
- `jobs.JobService`: submitting (every kind of job: the one check, `admission`) and
  cancelling;
- `loras`: resolving `<lora:…>` tags, registering the server library;
- `access.is_admin`: who may act as a server admin.
"""

from __future__ import annotations

from dataclasses import dataclass

import discord
import sqlite_utils

from bot.photo_helper.process import FaceProbe
from bot.services.access import is_admin
from bot.services.database import DbThread
from bot.services.dispatcher import Dispatcher
from bot.services.jobs import JobService
from bot.services.loras import LoraResolver
from bot.services.messages import JobMessages, MessageBoards, TrainingMessages
from bot.services.safety import SafetyGate
from pipeline.contract.blobs import BlobStore
from pipeline.contract.config import Config
from pipeline.contract.pool import WorkerPool


@dataclass(frozen=True, eq=False)
class Services:
    config: Config
    db: DbThread
    blobs: BlobStore
    pool: WorkerPool
    face_probe: FaceProbe
    dispatcher: Dispatcher
    boards: MessageBoards  # each kind of job's messages: generation's, training's
    messages: JobMessages  # generation's
    jobs: JobService
    loras: LoraResolver
    safety: SafetyGate  # NSFW policy, filters, role gates, quotas, rate limits

    def is_admin(self, interaction: discord.Interaction) -> bool:
        """Manage Server (or Administrator), or the configured admin role."""
        return is_admin(interaction, self.config)

    async def stop(self) -> None:
        """Stop the dispatcher and the face probe (the bot is closing)."""
        await self.boards.stop()
        await self.dispatcher.stop()
        self.face_probe.close()

    def release(self) -> None:
        """After stop(): let the database thread finish (the launcher closes the db)."""
        self.db.release()


def build_services(
    client: discord.Client,
    *,
    config: Config,
    db: sqlite_utils.Database,
    blobs: BlobStore,
    pool: WorkerPool,
    face_probe: FaceProbe | None = None,
) -> Services:
    """Wire the services; ``client`` is the Discord connection the messages post through."""
    db_thread = DbThread(db)
    boards = MessageBoards(config, db_thread)
    dispatcher = Dispatcher(
        config.storage.database, pool, blobs, config, on_event=boards.on_job_event
    )
    face_probe = face_probe or FaceProbe()
    safety = SafetyGate(config, db_thread, face_probe)
    messages = boards.add(
        JobMessages(client, config=config, db=db_thread, blobs=blobs, safety=safety)
    )
    # Training's samples are results too: the server's NSFW policy applies to them.
    boards.add(TrainingMessages(client, config=config, db=db_thread, blobs=blobs, safety=safety))
    return Services(
        config=config,
        db=db_thread,
        blobs=blobs,
        pool=pool,
        face_probe=face_probe,
        dispatcher=dispatcher,
        boards=boards,
        messages=messages,
        jobs=JobService(config, db_thread, blobs, dispatcher, boards, safety),
        loras=LoraResolver(config, db_thread),
        safety=safety,
    )
