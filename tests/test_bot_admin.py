"""End to end: /admin through the emulator — priority, stats, reloading the LoRA library,
and refusal for members without Manage Server."""

from __future__ import annotations

import pytest
from diffusers import StableDiffusionPipeline

from bot import store
from tests.botkit import *  # noqa: F403 - the end-to-end kit (botkit.__all__)
from tests.lycoris_files import write_lora

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]


async def test_admin_commands_and_their_refusal(emu, shared_pool, tiny_sd, tmp_path):  # noqa: F811
    library = tmp_path / "library"
    library.mkdir()
    config = make_config(
        tiny_sd, data_dir_for(shared_pool, tmp_path), emu, loras={"dir": str(library)}
    )
    async with running_sdbot(config, shared_pool):
        # A slow job holds the worker; alice queues two more, bob one after them.
        await queued_job(await imagine(emu, "slow", steps=150, size="256x256"))
        await queued_job(await imagine(emu, "a"))
        await queued_job(await imagine(emu, "b", user=emu.bob))
        last = await queued_job(await imagine(emu, "c"))  # fair order: after a and b
        db = store.open_db(config.storage.database)
        before = store.queue_position(db, last)

        refused = await error_reply(
            await emu.send_command(
                "admin", {"job": last, "level": 5}, subcommand="priority", user=emu.bob
            )
        )
        raised = await reply(
            await emu.send_command(
                "admin", {"job": last, "level": 5}, subcommand="priority", user=emu.admin
            )
        )
        stats = await reply(await emu.send_command("admin", {}, subcommand="stats", user=emu.admin))
        write_lora(
            library / "newstyle.safetensors",
            StableDiffusionPipeline.from_pretrained(tiny_sd),
            "kohya",
            seed=4,
        )
        good = (library / "newstyle.safetensors").read_bytes()
        (library / "broken.safetensors").write_bytes(good[: len(good) // 2])  # cut mid-tensor
        reloaded = await reply(
            await emu.send_command("admin", {}, subcommand="reload-loras", user=emu.admin)
        )
        usable = await queued_job(await imagine(emu, "a cat <lora:newstyle:0.5>", user=emu.bob))
        broken = await error_reply(await imagine(emu, "a cat <lora:broken>", user=emu.bob))
        # Leave the shared worker idle for the next test.
        for job in store.user_jobs(db, emu.alice.id) + store.user_jobs(db, emu.bob.id):
            if job["status"] in ("queued", "running"):
                owner = emu.alice if job["user_id"] == emu.alice.id else emu.bob
                await reply(await emu.send_command("cancel", {"job": job["id"]}, user=owner))
    assert "Only server admins" in refused
    assert before > 1 and "position 1" in raised["content"] and raised["flags"] & 64
    assert "**Queue**" in stats["content"] and "waiting" in stats["content"]
    # Each worker's loaded model with its memory plan and estimated peak (issue 26).
    worker = next(iter(shared_pool.workers())).name
    assert f"- {worker}: tiny plan full, est. peak " in stats["content"], stats["content"]
    assert "Added 1 LoRA(s)" in reloaded["content"] and usable  # the broken file is not
    assert broken.startswith("LoRA 'broken' not found")  # registered: nothing is queued
    command = emu.get_command("admin", guild_only=True)
    assert int(command["default_member_permissions"]) == 1 << 5  # Manage Server


def test_stats_lists_as_many_models_as_fit_in_one_message():
    from bot.cogs.admin import MESSAGE_LIMIT, _fitting

    head = ["**Queue**: 0 waiting, 0 running; workers: 8 free of 8", "**Memory** (loaded models):"]
    items = [
        f"local-{i}-cuda:{i}: flux-dev plan fp8-offload, est. peak 17.7 GB, measured 16.2 GB "
        "(GPU allocated)"
        for i in range(40)
    ]
    lines = _fitting(head, items)
    assert len("\n".join(head + lines)) <= MESSAGE_LIMIT
    assert lines[-1] == f"- … and {40 - (len(lines) - 1)} more (see /metrics)"
    assert _fitting(head, items[:3]) == [f"- {item}" for item in items[:3]]
