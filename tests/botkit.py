"""Helpers for the bot's end-to-end tests: the real bot, the emulator, real workers.

The bot starts exactly as `sdbot run` starts it (`bot.launcher.serve`) with a
config whose `discord.api_url`/`gateway_url` point at the loopback emulator and
whose model is the session's tiny random-weight model.

One worker pool (a real spawned worker process running the tiny model on the
CPU) is shared by every bot in the session: starting one costs 10-20 s here. A
pool reads job inputs from its config's blob folder, so each test's data dir gets
its own database but its `blobs/` is a link to the pool's blob folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from PIL import Image

from bot.launcher import serve
from pipeline.contract.config import Config, config_from_dict
from pipeline.contract.infotext import parse_infotext, read_infotext
from pipeline.workers.local_pool import LocalPool
from tests.emulator import DiscordEmulator, EmulatedUser, InteractionRecord, emulated_discord

# What `from tests.botkit import *` gives an end-to-end test: its fixtures and helpers.
__all__ = [
    "RESULT_TIMEOUT",
    "attach",
    "config",
    "config_toml",
    "custom_ids",
    "data_dir_for",
    "emu",
    "error_reply",
    "imagine",
    "make_config",
    "photo",
    "png_bytes",
    "queued_job",
    "reply",
    "result_images",
    "result_messages",
    "running_sdbot",
    "shared_pool",
    "wait_result",
]

BOT_TOKEN = "botkit-token"
RESULT_TIMEOUT = 240.0  # a tiny job takes 1-20 s on a busy 2-core machine
JOB_ID = re.compile(r"Queued `([0-9a-f]+)`")

BASE_CONFIG: dict[str, Any] = {
    "defaults": {
        "sampler": "Euler a",
        "schedule": "Automatic",
        "steps": 2,
        "cfg_scale": 5.0,
        "width": 64,
        "height": 64,
    },
    "limits": {"max_prompt_chars": 500, "max_input_pixels": 1024 * 1024},
    "workers": {"backend": "local", "devices": ["cpu"], "preview_every": 1, "batch_size": 1},
    "queue": {"max_queued_per_user": 4},
    "attachments": {"max_mb": 10.0},
}


def make_config(
    tiny_sd: Path,
    data_dir: Path,
    emulator: DiscordEmulator | None = None,
    **sections: dict[str, Any],
) -> Config:
    """The test config; ``sections`` replace keys of BASE_CONFIG's tables."""
    data = copy.deepcopy(BASE_CONFIG)
    data["models"] = {"tiny": {"source": str(tiny_sd)}}
    data["storage"] = {"data_dir": str(data_dir)}
    if emulator is not None:
        data["discord"] = {
            "guild_ids": [int(emulator.guild_id)],
            "api_url": emulator.api_url,
            "gateway_url": emulator.gateway_url,
            "progress_interval": 0.2,
        }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data)


# -- fixtures (session event loop: the pool's pipes are watched by that loop) ----------------


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def shared_pool(
    tiny_sd: Path, tmp_path_factory, tiny_control, tiny_edit
) -> AsyncIterator[LocalPool]:
    # The worker also knows the tiny ControlNet units and IP-Adapter (tests/test_bot_control.py)
    # and the tiny editing model, "edit" (tests/test_bot_edit.py); it loads a model when a job
    # first asks for it.
    config = make_config(
        tiny_sd,
        tmp_path_factory.mktemp("pool") / "data",
        models={"edit": {"source": str(tiny_edit)}},
        **tiny_control,
    )
    pool = LocalPool(config)
    await pool.start()
    yield pool
    await pool.close()


@pytest_asyncio.fixture(loop_scope="session")
async def emu() -> AsyncIterator[DiscordEmulator]:
    async with emulated_discord() as emulator:
        yield emulator
    # Known routes only, no 4xx/5xx the test did not declare (emulator.expect_errors), and
    # no request sent into a rate limit the headers had announced.
    emulator.check_clean()


def config_toml(model: Path, data_dir: Path, emulator, *, progress_interval: float = 0.5) -> str:
    """The config.toml of a bot process (`sdbot run`) on the tiny model that talks to the
    emulator, with one CPU worker; callers append their own tables."""
    return f"""
[models.tiny]
source = "{model}"

[discord]
guild_ids = [{emulator.guild_id}]
api_url = "{emulator.api_url}"
gateway_url = "{emulator.gateway_url}"
progress_interval = {progress_interval}

[storage]
data_dir = "{data_dir}"

[defaults]
sampler = "Euler a"
schedule = "Automatic"
steps = 2
width = 64
height = 64
"""


def data_dir_for(pool: LocalPool, tmp_path: Path) -> Path:
    """A fresh data dir whose blobs/ is the shared pool's blob folder."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    link = data_dir / "blobs"
    if not link.exists():
        shared = Path(pool.config.storage.blobs)
        shared.mkdir(parents=True, exist_ok=True)
        link.symlink_to(shared.resolve(), target_is_directory=True)
    return data_dir


@pytest.fixture
def config(emu, shared_pool, tiny_sd, tmp_path):  # noqa: F811
    """The test config of a bot that talks to this test's emulator and the shared pool."""
    return make_config(tiny_sd, data_dir_for(shared_pool, tmp_path), emu)


@contextlib.asynccontextmanager
async def running_sdbot(
    config: Config, pool: LocalPool | None = None, timeout: float = 60.0
) -> AsyncIterator[asyncio.Task]:
    """`serve(config)` as a task, ready (logged in, commands synced) for the block."""
    ready = asyncio.Event()
    task = asyncio.create_task(serve(config, BOT_TOKEN, ready=ready, pool=pool))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()  # re-raises the start-up error
        raise RuntimeError("the bot stopped before it was ready")
    if not ready.is_set():
        await stop(task)
        raise TimeoutError(f"bot not ready within {timeout}s")
    try:
        yield task
    finally:
        await stop(task)


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)


# -- acting as members ----------------------------------------------------------------------


async def reply(record: InteractionRecord, timeout: float = 30.0) -> dict:
    """The first answer the member sees (after "thinking…"), as a message dict."""
    return await record.wait_message(lambda m: m["content"], timeout=timeout)


async def queued_job(record: InteractionRecord) -> str:
    """The job id from the "Queued `id`" answer; fails with the answer otherwise."""
    message = await reply(record)
    match = JOB_ID.search(message["content"])
    assert match, f"not queued: {message['content']!r}"
    assert message["flags"] & 64, "the queue confirmation should be ephemeral"
    return match.group(1)


async def error_reply(record: InteractionRecord) -> str:
    """The ephemeral error text; asserts nothing was queued."""
    message = await reply(record)
    assert message["flags"] & 64, f"errors must be ephemeral: {message}"
    assert not JOB_ID.search(message["content"]), message["content"]
    return message["content"]


def custom_ids(message: dict) -> list[str]:
    return [
        c.get("custom_id", "")
        for row in message.get("components") or []
        for c in row.get("components") or []
    ]


def result_messages(emulator: DiscordEmulator, job_id: str) -> list[dict]:
    return [
        m
        for m in emulator.all_messages(ephemeral=False)  # threads and forum posts too
        if f"sdbot:info:{job_id}" in custom_ids(m)
    ]


async def wait_result(
    emulator: DiscordEmulator, job_id: str, timeout: float = RESULT_TIMEOUT
) -> dict:
    found = await emulator.wait_for(lambda: result_messages(emulator, job_id), timeout)
    return found[0]


def result_images(emulator: DiscordEmulator, message: dict) -> list[tuple[Image.Image, dict]]:
    """Each attached image, decoded, with its infotext parsed back."""
    out = []
    for attachment in message["attachments"]:
        data = emulator.attachment_data(attachment)
        image = Image.open(io.BytesIO(data))
        image.load()
        out.append((image, parse_infotext(read_infotext(data))))
    return out


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def photo(size: tuple[int, int] = (64, 64), colour: tuple[int, int, int] = (90, 140, 200)) -> bytes:
    """A plain test photo as PNG bytes."""
    return png_bytes(Image.new("RGB", size, colour))


async def imagine(
    emulator: DiscordEmulator, prompt: str, user: EmulatedUser | None = None, **options: Any
) -> InteractionRecord:
    return await emulator.send_command("imagine", {"prompt": prompt, **options}, user=user)


def attach(emulator: DiscordEmulator, data: bytes, name: str = "photo.png", **kw: Any) -> dict:
    return emulator.add_attachment(data, name, **kw)
