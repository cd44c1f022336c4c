"""`sdbot run` as a real process against the emulator: the way an admin runs it.

Checks that the bot process itself never loads torch (only its workers do), and
reports its resident memory with the workers excluded (they are other processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.botkit import *  # noqa: F403 - the end-to-end kit (botkit.__all__)
from tests.test_train_cli import run_cli

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parent.parent
TOKEN = "process-test-token-do-not-log"
RSS_TARGET_MB = 150


def write_config(path: Path, tiny_sd: Path, emulator) -> Path:
    text = config_toml(tiny_sd, path.parent / "data", emulator) + '\n[workers]\ndevices = ["cpu"]\n'
    path.write_text(text, encoding="utf-8")
    return path


def start_bot_process(config: Path, log: Path) -> subprocess.Popen:
    # PYTHONFAULTHANDLER: a bot that does not stop is sent SIGABRT, and its threads'
    # stacks land in the log the failure shows (see `stop_bot_process`).
    env = {
        **os.environ,
        "DISCORD_TOKEN": TOKEN,
        "SDBOT_DEBUG_MODULES": "1",
        "PYTHONFAULTHANDLER": "1",
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "--config", str(config), "run"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def stop_bot_process(process: subprocess.Popen, log: Path, timeout: float = 60) -> int:
    """Ctrl-C, as an admin stops it; its exit code. One that has not stopped in `timeout`
    seconds fails the test with its log and every thread's stack."""
    process.send_signal(signal.SIGINT)
    try:
        return await asyncio.to_thread(process.wait, timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)  # faulthandler writes the stacks to the log
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(process.wait, 10)
        process.kill()
        raise AssertionError(
            f"the bot did not stop within {timeout:g} s of Ctrl-C:\n{log.read_text()[-6000:]}"
        ) from None


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError("no VmRSS")


def mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


async def wait_ready(emulator, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the bot exited early:\n{log.read_text()}")
        return "SDBOT_DEBUG_MODULES" in log.read_text()

    await emulator.wait_for(ready, timeout)


async def test_sdbot_run_serves_imagine_without_torch(emu, tiny_sd, tmp_path):  # noqa: F811
    config = write_config(tmp_path / "config.toml", tiny_sd, emu)
    log = tmp_path / "bot.log"
    process = start_bot_process(config, log)
    try:
        await wait_ready(emu, process, log)
        job = await queued_job(await imagine(emu, "a lantern at dusk", seed=99))
        message = await wait_result(emu, job)
        [(image, info)] = result_images(emu, message)
        maps = mapped_libraries(process.pid)
        rss = rss_mb(process.pid)
    finally:
        code = await stop_bot_process(process, log)
    text = log.read_text()
    print(f"\nbot process RSS with a result posted: {rss:.0f} MB (workers excluded)")
    assert info["Seed"] == "99" and image.size == (64, 64)
    assert "heavy modules in the bot process: none" in text, text
    assert "libtorch" not in maps and "cv2" not in maps
    assert TOKEN not in text  # the token is never logged
    assert rss < RSS_TARGET_MB, f"bot process RSS {rss:.0f} MB"
    assert code == 0, text


async def test_sdbot_run_without_a_token_explains_how_to_get_one(tmp_path, tiny_sd):
    config = tmp_path / "config.toml"
    config.write_text(f'[models.tiny]\nsource = "{tiny_sd}"\n', encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    done = await asyncio.to_thread(
        run_cli, ["--config", str(config), "run"], cwd=REPO, env=env, timeout=120
    )
    assert done.returncode == 2
    assert "DISCORD_TOKEN is not set" in done.stderr
    assert "applications.commands" in done.stderr and "export DISCORD_TOKEN=" in done.stderr
