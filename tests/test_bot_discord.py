"""The bot against Discord as it really behaves: permissions, places, reconnects, 429s.

Real bot, real worker (tiny model), the strict emulator. Each test says what a
member sees; the emulator's teardown fails on any error answer or rate-limit
breach the test did not declare.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from bot import store
from bot.errors import DM_ANSWER
from tests import discord_rules as rules
from tests.botkit import *  # noqa: F403 - the end-to-end kit (botkit.__all__)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]


def assert_a_real_image(emulator, message: dict) -> None:
    """The member sees one 64×64 picture with something in it (not a flat fill)."""
    [(image, info)] = result_images(emulator, message)
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert image.size == (64, 64) and "Seed" in info
    assert pixels.std() > 2, "a flat image"


@pytest.mark.parametrize(
    ("missing", "name"),
    [
        (rules.VIEW_CHANNEL, "View Channel"),
        (rules.SEND_MESSAGES, "Send Messages"),
        (rules.ATTACH_FILES, "Attach Files"),
        (rules.EMBED_LINKS, "Embed Links"),
    ],
)
async def test_a_channel_the_bot_cannot_post_in_is_named_and_nothing_is_queued(
    emu,  # noqa: F811
    shared_pool,  # noqa: F811
    config,
    missing,
    name,
):
    allowed = emu.bot_permissions_in(emu.channel_id) & ~missing
    locked = emu.add_channel("locked", bot_permissions=allowed)
    async with running_sdbot(config, shared_pool):
        record = await emu.send_command("imagine", {"prompt": "a fox"}, channel_id=locked)
        text = await error_reply(record)
    # The member reads which permission is missing, in one line, only for them.
    assert f"**{name}** permission" in text and "\n" not in text
    db = store.open_db(config.storage.database)
    assert store.user_jobs(db, emu.alice.id) == []  # nothing queued, nothing to retry
    assert emu.requests_to("POST", f"/channels/{locked}/messages") == []


async def test_results_land_in_a_thread_and_in_a_forum_post(emu, shared_pool, config):  # noqa: F811
    thread = emu.add_channel("fox pictures", kind=11)
    forum = emu.add_channel("gallery", kind=15)
    post = emu.add_channel("my foxes", kind=11, parent_id=forum)
    async with running_sdbot(config, shared_pool):
        jobs = {}
        for place in (thread, post):
            record = await emu.send_command("imagine", {"prompt": "a fox"}, channel_id=place)
            jobs[place] = await queued_job(record)
        results = {place: await wait_result(emu, job) for place, job in jobs.items()}
        await progress_removed(emu, list(jobs.values()))
    for place, message in results.items():
        # The result is in the thread the member used, mentioning them, with the picture.
        assert message["channel_id"] == place and f"<@{emu.alice.id}>" in message["content"]
        assert_a_real_image(emu, message)
        assert emu.channel_messages(place, ephemeral=False) == [message]  # progress removed
    assert emu.channel_messages(forum) == []  # never into the forum itself


async def test_a_command_from_a_dm_gets_a_clear_answer(emu, shared_pool, tiny_sd, tmp_path):  # noqa: F811
    # Global commands (no guild_ids): what a DM could be offered; DMs turned off.
    config = make_config(
        tiny_sd,
        data_dir_for(shared_pool, tmp_path),
        emu,
        discord={"guild_ids": []},
        safety={"dms": "refuse"},
    )
    async with running_sdbot(config, shared_pool):
        imagine_command = emu.get_command("imagine")
        assert imagine_command["contexts"] == [0]  # guild channels only
        dm = emu.dm_channel(emu.alice)["id"]
        with pytest.raises(LookupError, match="offers no /imagine in DMs"):
            await emu.send_command("imagine", {"prompt": "a fox"}, channel_id=dm)
        # A stale command (synced before contexts were set) still reaches the bot.
        record = await emu.send_command(
            "imagine", {"prompt": "a fox"}, channel_id=dm, force_dm=True
        )
        await record.wait_response()
    assert record.ephemeral and record.messages[0]["content"] == DM_ANSWER
    db = store.open_db(config.storage.database)
    assert store.user_jobs(db, emu.alice.id) == []


async def test_gateway_drops_mid_job_lose_and_duplicate_nothing(emu, shared_pool, config):  # noqa: F811
    async with running_sdbot(config, shared_pool):
        first = await queued_job(await imagine(emu, "a lantern", seed=1, steps=4))
        await emu.drop_gateway()  # resumable: the missed events are replayed
        during = await imagine_while_away(emu, "a kite")
        await emu.drop_gateway(resumable=False)  # INVALID_SESSION: the bot identifies again
        await emu.wait_for(lambda: len(emu.identify_payloads) == 2 and emu.connected)
        after = await queued_job(await imagine(emu, "a boat", seed=3))
        results = [await wait_result(emu, job) for job in (first, during, after)]
        await progress_removed(emu, [first, during, after])
    assert emu.replayed and len(emu.resumes) == 2
    for job, message in zip((first, during, after), results):
        assert len(result_messages(emu, job)) == 1  # exactly once
        assert_a_real_image(emu, message)


async def imagine_while_away(emulator, prompt: str) -> str:
    """/imagine sent while the bot's websocket is down (it arrives with the RESUME)."""
    record = await emulator.send_command("imagine", {"prompt": prompt, "seed": 2}, wait=False)
    await record.wait_response(3.0)
    return await queued_job(record)


async def progress_removed(emulator, jobs: list[str]) -> None:
    """Wait until each job's progress message is deleted (after its result is up)."""

    def gone() -> bool:
        deleted = {i for m in emulator.deleted_messages for i in custom_ids(m)}
        return all(f"sdbot:cancel:{job}" in deleted for job in jobs)

    await emulator.wait_for(gone, 30)


POSITION = re.compile(r"Queued — (position \d+|waiting)")


async def test_progress_edits_stay_in_order_and_spaced_under_429s(emu, shared_pool, config):  # noqa: F811
    emu.rate_limiter.chaos = 0.3  # random shared 429s on edits
    async with running_sdbot(config, shared_pool):
        jobs = []
        for i in range(2):
            for user in (emu.alice, emu.bob):
                jobs.append(await queued_job(await imagine(emu, f"a cat {i}", user=user, seed=i)))
        results = [await wait_result(emu, job) for job in jobs]
        await progress_removed(emu, jobs)
    assert any(r.scope == "shared" for r in emu.rate_limiter.limited), "no 429 was tried"
    for job, message in zip(jobs, results):
        assert len(result_messages(emu, job)) == 1
        assert_a_real_image(emu, message)
    progress_ids = {
        m["id"]
        for m in emu.deleted_messages
        if any(i.startswith("sdbot:cancel:") for i in custom_ids(m))
    }
    assert len(progress_ids) == len(jobs)  # each progress message removed after its result
    interval = config.discord.progress_interval
    for message_id in progress_ids:
        edits = [r for r in emu.requests_to("PATCH", f"/messages/{message_id}$") if r.status == 200]
        texts = [r.json["content"] for r in edits]
        # Once past the queue, a message never shows "Queued — position N" again.
        started = [i for i, t in enumerate(texts) if not POSITION.search(t)]
        assert all(not POSITION.search(t) for t in texts[started[0] :]) if started else True
        # One edit per message per interval, counted between edits Discord accepted.
        accepted = [r.at for r in edits]
        assert all(b - a >= interval * 0.9 for a, b in zip(accepted, accepted[1:])), accepted
