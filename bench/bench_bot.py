"""What the Discord layer costs: deferral latency, command-to-image overhead, bot RSS.

    python bench/bench_bot.py [--runs 5] [--steps 4] [--size 64] [--pings 20]

Runs `sdbot run` as a real subprocess against the loopback Discord emulator (in this
process), with the tiny random-weight model on a LocalPool, exactly as an admin runs it.

- Deferral: time from the emulator sending INTERACTION_CREATE (gateway frame) to the
  bot's callback POST arriving, for /queue and /imagine (target < 100 ms).
- Command to image: /imagine sent → result message posted in the channel, one job at a
  time, against the raw generation time of the same spec on a LocalPool driven
  directly (no bot, no SQLite, no Discord): the ratio is what the bot layer adds.
- RSS: the `sdbot run` process's resident memory after the runs; its workers are other
  processes and are not counted (target ≤ 150 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.contract.config import config_from_dict  # noqa: E402
from pipeline.contract.jobs import Done, GenerateSpec  # noqa: E402
from pipeline.workers.local_pool import LocalPool  # noqa: E402
from tests.emulator import DiscordEmulator, emulated_discord  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed /imagine jobs")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--pings", type=int, default=20, help="timed /queue deferrals")
    return parser.parse_args()


def config_text(model: Path, data: Path, emulator: DiscordEmulator | None) -> str:
    discord = ""
    if emulator is not None:
        discord = (
            f'[discord]\nguild_ids = [{emulator.guild_id}]\napi_url = "{emulator.api_url}"\n'
            f'gateway_url = "{emulator.gateway_url}"\n'
        )
    return (
        f'[models.tiny]\nsource = "{model}"\n{discord}'
        f'[storage]\ndata_dir = "{data}"\n[workers]\ndevices = ["cpu"]\n'
        '[defaults]\nsampler = "Euler a"\nschedule = "Automatic"\n'
    )


async def deferral_ms(emulator: DiscordEmulator, name: str, options: dict) -> float:
    loop = asyncio.get_running_loop()
    record = await emulator.send_command(name, options, wait=False)
    await record.responded.wait()
    return (loop.time() - record.sent_at) * 1000


async def command_to_image(emulator: DiscordEmulator, options: dict) -> tuple[float, float]:
    """(deferral ms, seconds until the result message is posted) for one /imagine."""
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    record = await emulator.send_command("imagine", options, wait=False)
    await record.responded.wait()
    deferral = (loop.time() - record.sent_at) * 1000
    message = await record.wait_message(lambda m: "Queued `" in m["content"], timeout=60)
    job = message["content"].split("`")[1]
    await emulator.wait_for(
        lambda: any(
            f"sdbot:info:{job}" in str(m["components"])
            for m in emulator.channel_messages(ephemeral=False)
        ),
        timeout=600,
    )
    return deferral, time.perf_counter() - start


async def raw_generation_s(model: Path, data: Path, spec: GenerateSpec, runs: int) -> list[float]:
    config = config_from_dict(
        {
            "models": {"tiny": {"source": str(model)}},
            "storage": {"data_dir": str(data)},
            "workers": {"devices": ["cpu"]},
        }
    )
    pool = LocalPool(config)
    await pool.start()
    times = []
    try:
        for i in range(runs + 1):
            start = time.perf_counter()
            async for event in pool.run([(f"raw{i}", spec.with_seed(i))]):
                assert not isinstance(event, Done) or event.images
            times.append(time.perf_counter() - start)
    finally:
        await pool.close()
    return times[1:]  # the first run warms caches


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def bot_figures(args: argparse.Namespace, model: Path, root: Path) -> dict:
    async with emulated_discord() as emulator:
        config = root / "bot.toml"
        config.write_text(config_text(model, root / "bot-data", emulator), encoding="utf-8")
        log = (root / "bot.log").open("wb")
        env = {**os.environ, "DISCORD_TOKEN": "bench", "SDBOT_DEBUG_MODULES": "1"}
        process = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "--config", str(config), "run"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            await emulator.wait_for(lambda: "heavy modules" in (root / "bot.log").read_text(), 300)
            options = {
                "prompt": "a lighthouse",
                "steps": args.steps,
                "size": f"{args.size}x{args.size}",
            }
            await command_to_image(emulator, {**options, "seed": 0})  # warm-up
            pings = [await deferral_ms(emulator, "queue", {}) for _ in range(args.pings)]
            runs = [
                await command_to_image(emulator, {**options, "seed": i + 1})
                for i in range(args.runs)
            ]
            rss = rss_mb(process.pid)
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(60)
            log.close()
        return {
            "pings": pings,
            "imagine": [d for d, _ in runs],
            "e2e": [s for _, s in runs],
            "rss": rss,
        }


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ms (max {max(values):.1f})"


async def main() -> None:
    args = parse_args()
    from pipeline.families.sd_tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = write_tiny_model(root / "tiny")
        figures = await bot_figures(args, model, root)
        spec = GenerateSpec(
            "a lighthouse", sampler="Euler a", steps=args.steps, width=args.size, height=args.size
        )
        raw = await raw_generation_s(model, root / "raw-data", spec, args.runs)
    e2e, raw_median = statistics.median(figures["e2e"]), statistics.median(raw)
    print(
        f"\n`python bench/bench_bot.py --runs {args.runs} --steps {args.steps} "
        f"--size {args.size} --pings {args.pings}` ({os.cpu_count()} CPUs, tiny model)\n"
    )
    print("| figure | value | target |")
    print("|---|---|---|")
    print(
        f"| INTERACTION_CREATE → deferral, /queue (n={args.pings}) "
        f"| {median_ms(figures['pings'])} | < 100 ms |"
    )
    print(
        f"| INTERACTION_CREATE → deferral, /imagine (n={args.runs}) "
        f"| {median_ms(figures['imagine'])} | < 100 ms |"
    )
    print(
        f"| /imagine → result posted ({args.size}², {args.steps} steps), median | {e2e:.2f} s | |"
    )
    print(f"| raw generation on a LocalPool, same spec, median | {raw_median:.2f} s | |")
    print(f"| ratio (bot end to end / raw) | {e2e / raw_median:.2f}× | |")
    print(f"| bot overhead per job (median difference) | {e2e - raw_median:.2f} s | |")
    print(f"| `sdbot run` RSS, workers excluded | {figures['rss']:.0f} MB | ≤ 150 MB |")


if __name__ == "__main__":
    asyncio.run(main())
