"""Load and faults through the strict Discord emulator: is every job delivered exactly once?

    OMP_NUM_THREADS=1 python bench/bench_discord_load.py [--members 20] [--jobs 10]
        [--channels 10] [--chaos 0.05]

`sdbot run` runs as a real subprocess (LocalPool, tiny random-weight model, CPU)
against the loopback emulator in this process, with Discord's rate limits
(tests/discord_ratelimits.py) and random shared 429s on a ``--chaos`` share of
message posts, edits and deletes. ``--members`` members in ``--channels`` channels
each send ``--jobs`` /imagine at random moments, and during the run:

- the gateway drops once (resumable: the missed events are replayed);
- one worker process is SIGKILLed mid-job (the job is retried);
- the bot process is SIGKILLed and restarted (it requeues what was running and
  posts the results finished while it was down).

Members send nothing while the bot is down (Discord would show "The application
did not respond"; those are not jobs). Printed: jobs submitted (queued, with an
id), results delivered, lost, duplicated; p50/p99 from INTERACTION_CREATE to the
bot's deferral; the 4xx answers the bot got (429s apart) and Discord's
invalid-request count (401/403/429 other than shared); the run's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.families.sd_tiny import write_tiny_model  # noqa: E402
from tests.botkit import config_toml  # noqa: E402
from tests.emulator import DiscordEmulator, EmulatedUser, emulated_discord  # noqa: E402

JOB_ID = re.compile(r"Queued `([0-9a-f]+)`")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=10, help="per member")
    parser.add_argument("--channels", type=int, default=10)
    parser.add_argument("--chaos", type=float, default=0.05, help="share of random 429s")
    parser.add_argument("--spread", type=float, default=60.0, help="seconds to submit over")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0, help="for every result")
    return parser.parse_args()


def config_text(model: Path, data: Path, emulator: DiscordEmulator, members: int) -> str:
    return config_toml(model, data, emulator, progress_interval=2.0) + (
        f'\n[workers]\ndevices = ["cpu"]\nbatch_size = 4\n\n'
        f"[queue]\nmax_queued_per_user = {members * 10}\n"
    )


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class BotProcess:
    """`sdbot run` as a subprocess; ``ready()`` waits for its start-up line."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.identified_before = 0

    def start(self, emulator: DiscordEmulator) -> None:
        self.identified_before = len(emulator.identify_payloads)
        env = {**os.environ, "DISCORD_TOKEN": "load-bench", "SDBOT_DEBUG_MODULES": "1"}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bot.cli", "--config", str(self.config), "run"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    async def ready(self, emulator: DiscordEmulator) -> None:
        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the bot exited:\n{self.log.read_text()[-3000:]}")
            text = self.log.read_text(errors="replace")
            return text.count("heavy modules in the bot process") >= self.starts

        await emulator.wait_for(up, 300)
        # This process's own session (a killed bot's may linger until its socket closes).
        await emulator.wait_for(
            lambda: len(emulator.identify_payloads) > self.identified_before and emulator.connected,
            60,
        )
        await asyncio.sleep(1.0)  # on_ready: commands synced, missed results posted

    def workers(self) -> list[int]:
        assert self.process is not None
        found = []
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            children = (task / "children").read_text().split()
            found += [int(pid) for pid in children]
        # Workers are spawned processes; the resource tracker is another child.
        return [pid for pid in found if b"spawn_main" in _cmdline(pid)]

    def kill(self) -> None:
        assert self.process is not None
        workers = self.workers()
        self.process.kill()
        self.process.wait(30)
        for pid in workers:  # orphaned workers would hold the CPU for the next bot
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


class Run:
    def __init__(self, args: argparse.Namespace, emulator: DiscordEmulator, bot: BotProcess):
        self.args, self.emulator, self.bot = args, emulator, bot
        self.rng = random.Random(args.seed)
        self.submitted: list[str] = []
        self.refused: list[str] = []
        self.bot_up = asyncio.Event()
        self.bot_up.set()
        self.sent = 0

    async def member(self, user: EmulatedUser, channel: str) -> None:
        for i in range(self.args.jobs):
            await asyncio.sleep(self.rng.uniform(0, 2 * self.args.spread / self.args.jobs))
            await self.bot_up.wait()
            self.sent += 1
            record = await self.emulator.send_command(
                "imagine",
                {"prompt": f"a lantern {user.username} {i}", "seed": i},
                user=user,
                channel_id=channel,
                wait=False,
            )
            try:
                message = await record.wait_message(lambda m: m["content"], timeout=30)
            except TimeoutError:
                self.refused.append(f"{user.username} {i}: no answer {record.errors}")
                continue
            match = JOB_ID.search(message["content"])
            if match:
                self.submitted.append(match.group(1))
            else:
                self.refused.append(f"{user.username} {i}: {message['content']}")

    async def faults(self) -> None:
        total = self.args.members * self.args.jobs
        await self.emulator.wait_for(lambda: self.sent >= total * 0.25, self.args.timeout)
        await self.emulator.drop_gateway()
        print(f"  gateway dropped after {self.sent} commands", flush=True)
        await self.emulator.wait_for(lambda: self.sent >= total * 0.4, self.args.timeout)
        workers = self.bot.workers()
        if workers:
            os.kill(workers[0], signal.SIGKILL)
            print(f"  worker {workers[0]} SIGKILLed after {self.sent} commands", flush=True)
        await self.emulator.wait_for(lambda: self.sent >= total * 0.6, self.args.timeout)
        self.bot_up.clear()
        await asyncio.sleep(3)  # let the commands in flight be answered
        self.bot.kill()
        print(f"  bot SIGKILLed after {self.sent} commands; restarting", flush=True)
        self.bot.start(self.emulator)
        await self.bot.ready(self.emulator)
        self.bot_up.set()

    def delivered(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for message in self.emulator.all_messages(ephemeral=False):
            for row in message.get("components") or []:
                for component in row.get("components") or []:
                    custom_id = component.get("custom_id") or ""
                    if custom_id.startswith("sdbot:info:") and custom_id.count(":") == 2:
                        job = custom_id.split(":")[2]
                        counts[job] = counts.get(job, 0) + 1
        return counts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def main() -> None:
    args = parse_args()
    root = Path(tempfile.mkdtemp(prefix="sdbot-load-"))
    model = write_tiny_model(root / "tiny")
    async with emulated_discord() as emulator:
        emulator.rate_limiter.chaos = args.chaos
        emulator.rate_limiter.chaos_routes = ("POST", "PATCH", "DELETE")
        users = [EmulatedUser(emulator._ids.next(), f"member{i:02d}") for i in range(args.members)]
        emulator.members += users
        channels = [emulator.channel_id] + [
            emulator.add_channel(f"art-{i}") for i in range(1, args.channels)
        ]
        config = root / "bot.toml"
        config.write_text(config_text(model, root / "data", emulator, args.members))
        bot = BotProcess(config, root / "bot.log")
        bot.start(emulator)
        try:
            await bot.ready(emulator)
            run = Run(args, emulator, bot)
            started = time.perf_counter()
            members = [run.member(u, channels[i % len(channels)]) for i, u in enumerate(users)]
            await asyncio.gather(run.faults(), *members)
            submitted = set(run.submitted)
            await emulator.wait_for(lambda: submitted <= set(run.delivered()), args.timeout)
            wall = time.perf_counter() - started
            await asyncio.sleep(2)  # any late duplicate would show now
        finally:
            bot.stop()
        counts = run.delivered()
        answered = [
            (r.responded_at - r.sent_at) * 1000
            for r in emulator.interactions
            if r.responded_at is not None and r.name == "imagine"
        ]
        errors = [(r.method, r.path, r.status) for r, _ in emulator.error_responses]
        limiter = emulator.rate_limiter
        print(f"members {args.members} × jobs {args.jobs} in {args.channels} channels")
        print(f"commands sent {run.sent}; jobs submitted {len(submitted)}; refused {run.refused}")
        print(f"results delivered {sum(1 for j in submitted if counts.get(j))}")
        print(f"lost {len(submitted - set(counts))}")
        print(f"duplicated {sum(1 for j in submitted if counts.get(j, 0) > 1)}")
        print(
            f"deferral p50 {statistics.median(answered):.0f} ms, "
            f"p99 {percentile(answered, 0.99):.0f} ms, max {max(answered):.0f} ms "
            f"(n={len(answered)})"
        )
        print(f"4xx answers {len(errors)}: {sorted(set(errors))[:10]}")
        shared = sum(1 for r in limiter.limited if r.scope == "shared")
        print(
            f"429s: {len(limiter.limited)} ({shared} random shared); "
            f"retried into a second 429: {len(limiter.violations)}"
        )
        print(f"invalid requests (Discord's count): {limiter.invalid_requests}")
        print("429s by route:", Counter((r.method, r.route, r.scope) for r in limiter.limited))
        print("violations:", Counter((r.method, r.route, r.scope) for r in limiter.violations))
        print(
            f"gateway: {len(emulator.identify_payloads)} identifies, "
            f"{len(emulator.resumes)} resumes, {len(emulator.replayed)} events replayed"
        )
        print(f"wall {wall:.0f} s; bot log {root / 'bot.log'}")


if __name__ == "__main__":
    asyncio.run(main())
