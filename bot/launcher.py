"""`sdbot run`: build the store, blob store, worker pool and the services (dispatcher,
submitting, messages, …), hand them to the bot and its cogs, and serve until stopped
(discord.py's advanced_startup pattern).

The Discord token comes from the DISCORD_TOKEN environment variable only, and is
never logged. The workers start in the background: the bot is online (and queues
jobs) while they load their models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

import discord

from bot import store
from bot.app import SDBot, report_heavy_modules
from bot.plumbing.endpoints import point_client_at
from bot.services import build_services
from pipeline.contract.blobs import BlobStore
from pipeline.contract.config import Config
from pipeline.contract.pool import WorkerPool
from pipeline.workers.local_pool import make_pool

log = logging.getLogger("sdbot")

EXIT_NO_TOKEN = 2
NO_TOKEN_HELP = """\
error: DISCORD_TOKEN is not set.

The bot needs a Discord bot token, read from the environment (never from a file):
  1. Open https://discord.com/developers/applications, create an application,
     and under "Bot" press "Reset Token" to get the token.
  2. Invite the bot: under "OAuth2 → URL Generator" tick the scopes `bot` and
     `applications.commands`, give it Send Messages, Attach Files and Embed Links,
     and open the generated URL to add it to your server.
  3. export DISCORD_TOKEN=your-token   (then run `sdbot run` again)
"""


def run_bot(config: Config) -> int:
    """Run the bot until Ctrl-C or SIGTERM; the exit code for the CLI."""
    token = os.environ.get("DISCORD_TOKEN", "").strip()
    if not token:
        print(NO_TOKEN_HELP, file=sys.stderr)
        return EXIT_NO_TOKEN
    try:
        asyncio.run(_serve_until_signal(config, token))
    except KeyboardInterrupt:
        pass
    except discord.LoginFailure:
        print(
            "error: Discord rejected DISCORD_TOKEN. Reset the token under 'Bot' in the "
            "Developer Portal and export the new one.",
            file=sys.stderr,
        )
        return EXIT_NO_TOKEN
    return 0


async def _serve_until_signal(config: Config, token: str) -> None:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    # SIGINT too, explicitly: a process started in the background by a non-interactive
    # shell (a script's `sdbot run &`, a CI runner) inherits SIGINT ignored, and Python
    # then never raises KeyboardInterrupt, so `kill -INT` would not stop the bot.
    for stop in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # Windows has no add_signal_handler
            loop.add_signal_handler(stop, task.cancel)  # type: ignore[union-attr]
    with contextlib.suppress(asyncio.CancelledError):
        await serve(config, token)


async def serve(
    config: Config,
    token: str,
    *,
    ready: asyncio.Event | None = None,
    pool: WorkerPool | None = None,
) -> None:
    """Serve until the bot is closed or this task is cancelled; always cleans up.

    ``ready`` is set once the bot is logged in, commands are synced and the guilds
    are known. ``pool``: an already started pool to use (and leave running), e.g.
    one shared by several tests; by default the config's pool is made and owned.
    """
    # 1. Where Discord is (tests and Discord-compatible servers set these).
    if config.discord.api_url or config.discord.gateway_url:
        point_client_at(config.discord.api_url or None, config.discord.gateway_url or None)
    # 2. Storage: SQLite is the source of truth, blobs hold every file.
    data_dir = config.storage.database.parent
    data_dir.mkdir(parents=True, exist_ok=True)
    db = await asyncio.to_thread(store.open_db, config.storage.database)
    blobs = BlobStore(config.storage.blobs)
    # 3. Workers: started in the background so the bot is online while models load.
    own_pool = pool is None
    pool = pool or make_pool(config)
    bot = SDBot(config=config)
    services = build_services(bot, config=config, db=db, blobs=blobs, pool=pool)
    bot.services = services  # the cogs take them from here at setup
    bot.ready_event = ready
    pool_start = asyncio.create_task(_start_pool(pool, bot)) if own_pool else None
    try:
        async with bot:
            await bot.start(token)
    finally:
        failed_start = None
        if pool_start is not None:
            pool_start.cancel()
            outcome = await asyncio.gather(pool_start, return_exceptions=True)
            failed_start = outcome[0] if isinstance(outcome[0], Exception) else None
        if not bot.is_closed():
            await bot.close()
        if own_pool:
            await pool.close()
        services.release()
        db.close()
        log.info("sdbot stopped")
    if failed_start is not None:
        raise failed_start  # `sdbot run` exits non-zero with the pool's message


async def _start_pool(pool: WorkerPool, bot: SDBot) -> None:
    try:
        await pool.start()
    except Exception:
        # Without workers no job can ever run: stop, loudly, instead of queueing forever.
        log.exception("the worker pool could not start; stopping the bot")
        await bot.close()
        raise
    log.info("workers ready (%d)", pool.capacity)
    if os.environ.get("SDBOT_DEBUG_MODULES"):
        report_heavy_modules()
