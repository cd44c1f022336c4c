"""/settings, /queue and /forget end to end: real bot, emulator, worker, tiny model."""

from __future__ import annotations

import pytest

from bot import store
from tests.botkit import *  # noqa: F403 - the end-to-end kit (botkit.__all__)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]


async def test_settings_apply_to_the_next_imagine(emu, shared_pool, config):  # noqa: F811
    async with running_sdbot(config, shared_pool):
        shown = await reply(await emu.send_command("settings"))
        assert shown["flags"] & 64 and "(server default)" in shown["content"]

        saved = await reply(
            await emu.send_command("settings", {"steps": 3, "sampler": "Euler", "size": "64x128"})
        )
        assert saved["content"].startswith("Saved.") and "**Steps**: 3" in saved["content"]

        mine = await wait_result(emu, await queued_job(await imagine(emu, "a boat")))
        # Bob never changed his settings: he still gets the server's defaults.
        his = await wait_result(emu, await queued_job(await imagine(emu, "a boat", user=emu.bob)))

        await emu.send_command("settings", {"reset": True})
        after_reset = await wait_result(emu, await queued_job(await imagine(emu, "a boat")))
    [(image, info)] = result_images(emu, mine)
    assert info["Steps"] == "3" and info["Sampler"] == "Euler" and image.size == (64, 128)
    [(_, bob_info)] = result_images(emu, his)
    assert bob_info["Steps"] == "2" and bob_info["Sampler"] == "Euler a"
    [(_, reset_info)] = result_images(emu, after_reset)
    assert reset_info["Steps"] == "2"


async def test_settings_refuse_values_over_the_limits(emu, shared_pool, config):  # noqa: F811
    async with running_sdbot(config, shared_pool):
        steps = await error_reply(await emu.send_command("settings", {"steps": 500}))
        size = await error_reply(await emu.send_command("settings", {"size": "4096x4096"}))
        sampler = await error_reply(await emu.send_command("settings", {"sampler": "Eulr a"}))
        shown = await reply(await emu.send_command("settings"))
    assert steps == "Steps must be between 1 and 150, but is 500"
    assert size == "Width must be between 64 and 2048, but is 4096"
    assert sampler.startswith("Unknown sampler 'Eulr a'. Did you mean Euler a")
    assert "**Steps**: 2 *(server default)*" in shown["content"]  # nothing was saved


async def test_queue_lists_jobs_with_status_and_position(emu, shared_pool, config):  # noqa: F811
    async with running_sdbot(config, shared_pool):
        empty = await reply(await emu.send_command("queue"))
        busy = await queued_job(await imagine(emu, "slow one", steps=150, size="256x256"))
        waiting = await queued_job(await imagine(emu, "second"))
        listing = await reply(await emu.send_command("queue"))
        await reply(await emu.send_command("cancel"))  # no job given: the latest one
        await reply(await emu.send_command("cancel"))
        db = store.open_db(config.storage.database)
        await emu.wait_for(lambda: store.get_job(db, busy)["status"] == "cancelled", 120)
    assert "no jobs yet" in empty["content"]
    assert f"`{waiting}` queued, position 1 — second" in listing["content"]
    assert f"`{busy}` running — slow one" in listing["content"]
    assert store.get_job(db, waiting)["status"] == "cancelled"


async def test_forget_deletes_every_row_and_file_of_the_member(emu, shared_pool, config):  # noqa: F811
    async with running_sdbot(config, shared_pool):
        await emu.send_command("settings", {"steps": 3})
        source = attach(emu, photo((64, 64), (10, 20, 30)))
        job = await queued_job(
            await emu.send_command("img2img", {"image": source, "prompt": "mine"})
        )
        result = await wait_result(emu, job)
        theirs = await wait_result(emu, await queued_job(await imagine(emu, "b", user=emu.bob)))
        db = store.open_db(config.storage.database)
        alice = str(emu.alice.id)
        shas = store.blob_refs(store.get_job(db, job)["spec"]) | store.blob_refs(
            store.get_job(db, job)["result"]
        )
        blobs = config.storage.blobs
        assert len(shas) == 2 and all(any(blobs.glob(f"*/{sha}*")) for sha in shas)

        prompt = await emu.send_command("forget")
        assert prompt.ephemeral
        refused = await reply(
            await emu.click(prompt.original, f"sdbot:forget:{alice}", user=emu.bob)
        )
        assert "for the member who asked" in refused["content"]
        assert store.get_job(db, job) is not None
        done = await reply(await emu.click(prompt.original, f"sdbot:forget:{alice}"))
    assert "deleted 1 job(s)" in done["content"]
    for table in ("jobs", "settings", "queue_users", "loras"):
        column = "owner_id" if table == "loras" else "user_id"
        assert (
            db.execute(f"SELECT COUNT(*) FROM {table} WHERE {column} = ?", [alice]).fetchone()[0]
            == 0
        ), table
    assert not any(any(blobs.glob(f"*/{sha}*")) for sha in shas)
    assert emu.get_message(result["id"]) is None  # her posted image went too
    assert emu.get_message(theirs["id"]) is not None  # Bob's stays
    assert f"sdbot:info:{job}" in custom_ids(result)


async def test_autocomplete_offers_at_most_25_matching_choices(emu, shared_pool, config):  # noqa: F811
    async with running_sdbot(config, shared_pool):
        base = {"prompt": "x"}
        samplers = await emu.send_autocomplete("imagine", {**base, "sampler": ""}, "sampler")
        dpm = await emu.send_autocomplete("imagine", {**base, "sampler": "dpm++ 2m"}, "sampler")
        sizes = await emu.send_autocomplete("imagine", {**base, "size": ""}, "size")
        models = await emu.send_autocomplete("imagine", {**base, "model": "ti"}, "model")
        jobs = await emu.send_autocomplete("cancel", {"job": ""}, "job")
    assert len(samplers) == 25
    assert dpm and all(c["name"].lower().startswith("dpm++ 2m") for c in dpm)
    assert sizes[0]["value"] == "64x64" and "1536x640" in {c["value"] for c in sizes}
    assert all(int(w) * int(h) <= 1536 * 1536 for w, h in (c["value"].split("x") for c in sizes))
    assert [c["value"] for c in models] == ["tiny"]
    assert jobs == []


async def test_waiting_jobs_see_their_position_move_up(emu, shared_pool, config):  # noqa: F811
    async with running_sdbot(config, shared_pool):
        slow = await queued_job(await imagine(emu, "slow", steps=150, size="256x256"))
        first = await queued_job(await imagine(emu, "first"))
        second = await queued_job(await imagine(emu, "second"))

        def progress_of(job: str) -> dict:
            return next(m for m in emu.channel_messages() if f"sdbot:cancel:{job}" in custom_ids(m))

        assert "position 2" in progress_of(second)["content"]
        await reply(await emu.send_command("cancel", {"job": first}))
        moved = await emu.wait_for(
            lambda: "position 1" in emu.get_message(progress_of(second)["id"])["content"], 30
        )
        for job in (second, slow):
            await reply(await emu.send_command("cancel", {"job": job}))
    assert moved
