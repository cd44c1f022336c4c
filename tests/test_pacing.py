"""The bot's global pacer (bot/plumbing/pacing.py) against the emulator's Discord limits.

Discord allows a bot 50 requests per second in all (topics/rate-limits; interaction
callbacks exempt). discord.py keeps each route's bucket but has no global limit of
its own, so a burst (a restart posting every missed result) meets global 429s; with
the pacer the same burst meets none. Both halves run the real discord.py client.
"""

from __future__ import annotations

import asyncio
import time

import discord
from discord.ext import commands
from discord.http import Route

from bot.plumbing.pacing import PER_SECOND, GlobalPacer, pace
from tests.emulator import emulated_discord, running_bot

CHANNELS, PER_CHANNEL = 30, 4  # 120 posts; 4 per channel stays inside its 5 / 5 s bucket


async def burst(bot: discord.Client, channels: list[str], tag: str) -> list:
    """Every post at once; what each returned (or raised)."""

    async def post(channel_id: str, i: int) -> None:
        route = Route("POST", "/channels/{channel_id}/messages", channel_id=channel_id)
        await bot.http.request(route, json={"content": f"{tag} {i}"})

    posts = (post(c, i) for c in channels for i in range(PER_CHANNEL))
    return await asyncio.gather(*posts, return_exceptions=True)


def global_429s(emulator) -> int:
    return sum(r.scope == "global" for r in emulator.rate_limiter.limited)


async def test_a_burst_meets_global_429s_without_the_pacer_and_none_with_it() -> None:
    async with emulated_discord() as emulator:
        plain = [emulator.add_channel(f"plain-{i}") for i in range(CHANNELS)]
        paced = [emulator.add_channel(f"paced-{i}") for i in range(CHANNELS)]
        bot = commands.Bot(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.none(),
            guild_ready_timeout=0.1,
        )
        async with running_bot(bot, emulator):
            unpaced_results = await burst(bot, plain, "plain")
            unpaced = global_429s(emulator)
            await asyncio.sleep(1.1)  # the global window empties
            pacer = pace(bot.http)
            started = time.monotonic()
            paced_results = await burst(bot, paced, "paced")
            took = time.monotonic() - started
        delivered = sum(len(emulator.channel_messages(c)) for c in paced)
    # discord.py alone: the burst is over 50/s, Discord answers with global 429s, and
    # some posts fail outright once discord.py's retries run out.
    assert unpaced > 0
    failed = [r for r in unpaced_results if isinstance(r, discord.HTTPException)]
    assert all(r.status == 429 for r in failed), failed
    # Paced: not one global 429, every message delivered, and the burst spread out.
    assert global_429s(emulator) == unpaced
    assert not [r for r in paced_results if isinstance(r, BaseException)]
    assert delivered == CHANNELS * PER_CHANNEL
    assert pacer.waited > 0 and took >= (CHANNELS * PER_CHANNEL) / PER_SECOND - 1.5


async def test_the_pacer_starts_at_most_its_rate_in_any_second() -> None:
    pacer = GlobalPacer(per_second=20)
    starts: list[float] = []

    async def one() -> None:
        await pacer.wait()
        starts.append(time.monotonic())

    await asyncio.gather(*(one() for _ in range(50)))
    assert len(starts) == 50
    for i, t in enumerate(starts):  # no 21 starts within one second
        assert sum(t <= s < t + 1.0 for s in starts[i:]) <= 20
