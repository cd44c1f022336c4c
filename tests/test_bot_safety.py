"""End to end through the emulator with the real detector (NudeNet) and the real worker:
the NSFW policy paths, per-server settings in two guilds, and DMs.

The flagged image is a real photo (skimage's astronaut) run through /inpaint with a mask
in one corner: inpainting keeps unmasked pixels exactly, so the result still shows her
face, and `[safety.labels] FACE_FEMALE = 0.5` (configuration, not a fake) makes the
detector's FACE_FEMALE score flag it. Nothing else about the detector is changed.
"""

from __future__ import annotations

import pytest
from PIL import Image
from skimage import data as photos

from bot import store
from tests.botkit import *  # noqa: F403 - the end-to-end kit (botkit.__all__)


async def wait_result(emulator, job_id, channel_id=None, timeout=RESULT_TIMEOUT):
    """The job's result message in ``channel_id`` (default: the main channel)."""

    def found():
        return [
            m
            for m in emulator.channel_messages(channel_id, ephemeral=False)
            if f"sdbot:info:{job_id}" in custom_ids(m)
        ]

    return (await emulator.wait_for(found, timeout))[0]


pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

SIZE = 128  # the detector finds her face from ~128 px (not at 64)


def astronaut_png() -> bytes:
    return png_bytes(Image.fromarray(photos.astronaut()).resize((SIZE, SIZE), Image.LANCZOS))


def corner_mask() -> bytes:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (SIZE - 16, SIZE - 16, SIZE, SIZE))
    return png_bytes(mask.convert("RGB"))


async def inpaint(emu, channel_id=None, user=None, **options):  # noqa: F811
    return await emu.send_command(
        "inpaint",
        {
            "image": attach(emu, astronaut_png(), "astronaut.png"),
            "mask": attach(emu, corner_mask(), "mask.png"),
            "prompt": "a portrait",
            **options,
        },
        channel_id=channel_id,
        user=user,
    )


async def admin_set(emu, key, value, channel_id=None):  # noqa: F811
    answer = await reply(
        await emu.send_command(
            "admin",
            {"key": key, "value": value},
            subcommand="settings",
            user=emu.admin,
            channel_id=channel_id,
        )
    )
    assert "is now" in answer["content"], answer["content"]


def posted_in(emu, channel_id, job):  # noqa: F811
    return [
        m
        for m in emu.channel_messages(channel_id, ephemeral=False)
        if job in str(m.get("components")) or f"`{job}`" in m["content"]
    ]


async def test_nsfw_policy_paths_in_two_guilds_and_dms(emu, shared_pool, tiny_sd, tmp_path):  # noqa: F811
    adult = emu.add_channel("adults-only", nsfw=True)
    other_guild, other_channel = emu.add_guild()
    config = make_config(
        tiny_sd,
        data_dir_for(shared_pool, tmp_path),
        emu,
        defaults={"width": SIZE, "height": SIZE},
        discord={"guild_ids": [int(emu.guild_id), int(other_guild)]},
        safety={
            "policy": "block",
            "labels": {"FACE_FEMALE": 0.5},
            "negative_prompt": "nsfw, nude",
            "blocked_ephemeral": True,
        },
    )
    async with running_sdbot(config, shared_pool):
        db = store.open_db(config.storage.database)
        # Server 1 posts flagged images as spoilers; server 2 allows them; config blocks.
        await admin_set(emu, "safety.policy", "spoiler")
        await admin_set(emu, "safety.policy", "allow", channel_id=other_channel)

        # 1. Age-restricted channel: as it is, and no safety negative prompt.
        adult_job = await queued_job(await inpaint(emu, channel_id=adult))
        adult_result = await wait_result(emu, adult_job, adult)
        # 2. Server 1's general channel: a spoiler, with the negative prompt added.
        spoiler_job = await queued_job(await inpaint(emu))
        spoiler_result = await wait_result(emu, spoiler_job)
        # 3. Server 2: allowed as it is (its own setting, not server 1's).
        allow_job = await queued_job(await inpaint(emu, channel_id=other_channel))
        allow_result = await wait_result(emu, allow_job, other_channel)

        # 4. Block, decided when the result is posted: server 1 tightens its policy while
        # the job waits behind a slow one.
        slow = await queued_job(await imagine(emu, "slow", user=emu.bob, steps=150))
        blocked_job = await queued_job(await inpaint(emu))
        await admin_set(emu, "safety.policy", "block")
        await reply(await emu.send_command("cancel", {"job": slow}, user=emu.bob))
        posted = await emu.wait_for(
            lambda: store.get_job(db, blocked_job)["message_id"], timeout=240
        )
        notice = emu.get_message(posted)
        private = await emu.wait_for(
            lambda: [
                m
                for r in emu.interactions
                for m in r.followups
                if m["flags"] & 64 and m["attachments"] and "Withheld" in m["content"]
            ]
        )
        # 5. Block on input: the same photo for img2img in a general channel is refused
        # before anything is queued; in the age-restricted channel it is accepted.
        jobs_before = len(store.user_jobs(db, emu.alice.id, limit=100))
        refused_input = await error_reply(
            await emu.send_command(
                "img2img",
                {"image": attach(emu, astronaut_png()), "prompt": "a portrait", "strength": 0.5},
            )
        )
        jobs_after = len(store.user_jobs(db, emu.alice.id, limit=100))
        # 6. DMs follow config.toml's policy (block): the same refusal there.
        refused_dm = await error_reply(
            await emu.send_command(
                "img2img",
                {"image": attach(emu, astronaut_png()), "prompt": "a portrait", "strength": 0.5},
                dm=True,
            )
        )
        shown = await reply(
            await emu.send_command("admin", {}, subcommand="settings", user=emu.admin)
        )
        other = await reply(
            await emu.send_command(
                "admin", {}, subcommand="settings", user=emu.admin, channel_id=other_channel
            )
        )
        audit = await reply(await emu.send_command("admin", {}, subcommand="audit", user=emu.admin))

    def names(message):
        return [a["filename"] for a in message["attachments"]]

    def negative(message):
        [(_, info)] = result_images(emu, message)
        return info.get("Negative prompt", "")

    assert names(adult_result)[0].startswith("sdbot-") and "nude" not in negative(adult_result)
    assert (
        names(spoiler_result)[0].startswith("SPOILER_") and "spoilers" in spoiler_result["content"]
    )
    assert "nsfw, nude" in negative(spoiler_result)
    assert names(allow_result)[0].startswith("sdbot-"), names(allow_result)
    # Labels and scores are stored with each image.
    for job in (adult_job, spoiler_job, allow_job, blocked_job):
        [image] = store.get_job(db, job)["result"]["images"]
        assert image["nsfw"]["FACE_FEMALE"] >= 0.5, image
    assert (
        "withheld" in notice["content"]
        and notice["attachments"] == []
        and "received them privately" in notice["content"]
    )
    assert private[0]["attachments"][0]["filename"].startswith("sdbot-")
    assert "flagged as explicit" in refused_input and "FACE_FEMALE" in refused_input
    assert jobs_after == jobs_before
    assert "flagged as explicit" in refused_dm
    assert "`safety.policy` = block *(this server)*" in shown["content"]
    assert "`safety.policy` = allow *(this server)*" in other["content"]
    assert "safety.policy = `block`" in audit["content"]
    db.close()
