"""End to end: the real bot (bot.launcher.serve) against the loopback Discord emulator,
with a real worker process running the tiny model on the CPU. Nothing is mocked."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from bot import store
from pipeline.contract.blobs import BlobStore
from pipeline.faces import detection as faces
from tests.botkit import *  # noqa: F403 - the end-to-end kit (botkit.__all__)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]


def astronaut(size: int = 160) -> Image.Image:
    # 160²: the smallest size at which the face detector still finds her face.
    return Image.fromarray(photos.astronaut()).resize((size, size), Image.LANCZOS)


async def _one_result(emu, shared_pool, config, command: str, options: dict):
    """Sends one slash command to a running bot and waits for its single result image;
    the image and its infotext."""
    async with running_sdbot(config, shared_pool):
        record = await emu.send_command(command, options)
        message = await wait_result(emu, await queued_job(record))
    [(image, info)] = result_images(emu, message)
    return image, info


async def test_imagine_posts_an_image_with_its_infotext(emu, shared_pool, config):  # noqa: F811
    async with running_sdbot(config, shared_pool):
        record = await imagine(emu, "a red fox in the snow", seed=1234)
        assert record.deferred and record.ephemeral
        job = await queued_job(record)
        message = await wait_result(emu, job)
        # The progress message (with its Cancel button) is removed once the result is up.
        progress = await emu.wait_for(
            lambda: [m for m in emu.deleted_messages if f"sdbot:cancel:{job}" in custom_ids(m)]
        )
    assert f"<@{emu.alice.id}>" in message["content"] and "1234" in message["content"]
    assert {"sdbot:reroll:" + job, "sdbot:delete:" + job} <= set(custom_ids(message))
    [(image, info)] = result_images(emu, message)
    assert image.size == (64, 64)
    assert info["Prompt"] == "a red fox in the snow"
    assert info["Seed"] == "1234" and info["Steps"] == "2"
    assert len(progress) == 1
    # Results go out as ordinary channel messages, never through the interaction token.
    assert emu.requests_to("POST", r"^/channels/\d+/messages$")


async def test_img2img_uses_the_attached_photo(emu, shared_pool, config):  # noqa: F811
    source = attach(emu, png_bytes(Image.new("RGB", (96, 64), (20, 160, 60))))
    image, info = await _one_result(
        emu,
        shared_pool,
        config,
        "img2img",
        {"image": source, "prompt": "a green field", "strength": 0.5},
    )
    assert info["Denoising strength"] == "0.5"
    assert image.width > image.height  # the photo's shape is kept


async def test_inpaint_with_a_mask_keeps_the_black_part(emu, shared_pool, config):  # noqa: F811
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 24, 64))  # repaint the left part only
    async with running_sdbot(config, shared_pool):
        record = await emu.send_command(
            "inpaint",
            {
                "image": attach(emu, png_bytes(original)),
                "mask": attach(emu, png_bytes(mask), "mask.png"),
                "prompt": "a brick wall",
                "strength": 1.0,
            },
        )
        message = await wait_result(emu, await queued_job(record))
    [(image, _)] = result_images(emu, message)
    out = np.asarray(image.convert("RGB"))
    # Well away from the (blurred) edge of the mask, every pixel is the original.
    assert np.array_equal(out[:, 40:], np.asarray(original)[:, 40:])
    assert not np.array_equal(out[:, :16], np.asarray(original)[:, :16])


async def test_inpaint_keep_face_repaints_all_but_the_face(emu, shared_pool, config):  # noqa: F811
    portrait = astronaut()
    async with running_sdbot(config, shared_pool):
        record = await emu.send_command(
            "inpaint",
            {
                "image": attach(emu, png_bytes(portrait)),
                "prompt": "an astronaut on the moon",
                "keep": "face",
                "strength": 1.0,
            },
        )
        message = await wait_result(emu, await queued_job(record))
    [(image, _)] = result_images(emu, message)
    assert image.size == portrait.size
    boxes = faces.detect_faces(portrait)
    kept = np.asarray(faces.keep_face_mask(portrait.size, boxes)) == 0
    out, original = np.asarray(image.convert("RGB")), np.asarray(portrait)
    assert kept.sum() > 200
    assert np.array_equal(out[kept], original[kept])
    assert not np.array_equal(out[~kept], original[~kept])


async def test_keep_face_without_a_face_queues_nothing(emu, shared_pool, config):  # noqa: F811
    coffee = Image.fromarray(photos.coffee()).resize((128, 96))
    async with running_sdbot(config, shared_pool):
        record = await emu.send_command(
            "inpaint",
            {"image": attach(emu, png_bytes(coffee)), "prompt": "tea", "keep": "face"},
        )
        text = await error_reply(record)
    assert text == "No face found in the photo; attach a mask instead"
    db = store.open_db(config.storage.database)
    assert store.user_jobs(db, emu.alice.id) == []


async def test_outpaint_extends_the_photo(emu, shared_pool, config):  # noqa: F811
    source = attach(emu, png_bytes(Image.new("RGB", (64, 64), (200, 120, 40))))
    image, info = await _one_result(
        emu, shared_pool, config, "outpaint", {"image": source, "direction": "right", "pixels": 32}
    )
    assert image.size == (96, 64)
    assert info["Outpaint"] == "right 32px"


async def test_result_buttons(emu, shared_pool, config):  # noqa: F811
    """Reroll draws a new seed; Upscale doubles the size; Info shows the parameters
    from the job row; Delete works for the requester and is refused to others."""
    async with running_sdbot(config, shared_pool):
        job = await queued_job(await imagine(emu, "a lighthouse", seed=7))
        first = await wait_result(emu, job)

        rerolled = await wait_result(
            emu, await queued_job(await emu.click(first, f"sdbot:reroll:{job}"))
        )
        upscaled = await wait_result(
            emu, await queued_job(await emu.click(first, f"sdbot:upscale:{job}"))
        )

        # Random weights draw no faces: Fix faces says so and queues nothing.
        no_face = await reply(await emu.click(first, f"sdbot:faces:{job}"))
        info = await reply(await emu.click(first, f"sdbot:info:{job}", user=emu.bob))
        refused = await reply(await emu.click(first, f"sdbot:delete:{job}", user=emu.bob))
        still_there = emu.get_message(first["id"]) is not None
        deleted = await reply(await emu.click(first, f"sdbot:delete:{job}"))
    [(_, first_info)] = result_images(emu, first)
    [(_, reroll_info)] = result_images(emu, rerolled)
    [(big, _)] = result_images(emu, upscaled)
    assert reroll_info["Prompt"] == "a lighthouse" and reroll_info["Seed"] != first_info["Seed"]
    assert big.size == (128, 128)
    assert no_face["flags"] & 64 and "No face found in this image" in no_face["content"]
    assert info["flags"] & 64 and "Seed: 7" in info["content"] and "a lighthouse" in info["content"]
    assert refused["flags"] & 64 and "only the member" in refused["content"].lower()
    assert still_there
    assert deleted["content"] == "Deleted." and emu.get_message(first["id"]) is None


async def test_cancel_a_queued_job_and_a_running_one(emu, shared_pool, config):  # noqa: F811
    async with running_sdbot(config, shared_pool):
        # A slow job keeps the only worker busy, so the second one waits in the queue.
        running = await queued_job(await imagine(emu, "slow", steps=150, size="256x256"))
        waiting = await queued_job(await imagine(emu, "never drawn"))
        choices = await emu.send_autocomplete("cancel", {"job": ""}, "job")
        assert {c["value"] for c in choices} >= {running, waiting}

        answer = await reply(await emu.send_command("cancel", {"job": waiting}))
        assert answer["content"] == f"Cancelled `{waiting}`." and answer["flags"] & 64

        progress = next(
            m for m in emu.channel_messages() if f"sdbot:cancel:{running}" in custom_ids(m)
        )
        # While it runs, its progress message shows step n/N and a preview image.
        shown = await emu.wait_for(
            lambda: (m := emu.get_message(progress["id"]))["attachments"] and m, 120
        )
        assert shown["attachments"][0]["filename"] == "preview.jpg"
        assert "step " in shown["content"] and "/150" in shown["content"]
        stopping = await reply(await emu.click(progress, f"sdbot:cancel:{running}"))
        assert "Stopping" in stopping["content"]
        db = store.open_db(config.storage.database)
        await emu.wait_for(lambda: store.get_job(db, running)["status"] == "cancelled", 120)
        assert store.get_job(db, waiting)["status"] == "cancelled"
        await emu.wait_for(lambda: "Cancelled." in emu.get_message(progress["id"])["content"], 30)
    assert result_messages(emu, running) == [] and result_messages(emu, waiting) == []


async def test_restart_between_queueing_and_completion(emu, shared_pool, config):  # noqa: F811
    """The bot stops with a job queued; a new bot on the same data dir finishes it and
    posts exactly one result, editing the same progress message."""
    async with running_sdbot(config, shared_pool):
        job = await queued_job(await imagine(emu, "a castle", steps=40, size="128x128"))
    db = store.open_db(config.storage.database)
    row = store.get_job(db, job)
    assert row["status"] in ("queued", "running") and row["progress_message_id"]
    async with running_sdbot(config, shared_pool):
        message = await wait_result(emu, job)
        await emu.wait_for(lambda: store.get_job(db, job)["message_id"], 30)
        deleted = lambda: {m["id"] for m in emu.deleted_messages}  # noqa: E731
        await emu.wait_for(lambda: row["progress_message_id"] in deleted(), 30)
    assert len(result_messages(emu, job)) == 1
    assert store.get_job(db, job)["message_id"] == message["id"]
    # The progress message posted before the restart was the one cleaned up after it.
    assert row["progress_message_id"] in {m["id"] for m in emu.deleted_messages}


async def test_a_result_recorded_but_not_posted_is_posted_after_a_restart(
    emu,  # noqa: F811
    shared_pool,  # noqa: F811
    config,
):
    async with running_sdbot(config, shared_pool):
        job = await queued_job(await imagine(emu, "a windmill"))
        await wait_result(emu, job)
        db = store.open_db(config.storage.database)
        await emu.wait_for(lambda: store.get_job(db, job)["message_id"], 30)
        # Its progress message is deleted and forgotten: a restart won't delete it again.
        await emu.wait_for(lambda: store.get_job(db, job)["progress_message_id"] == "", 30)
    posted = store.get_job(db, job)["message_id"]
    # As if the bot had died after posting the result, before saving its id: the restart
    # finds it in the channel and posts nothing twice.
    with db.conn:
        db.execute("UPDATE jobs SET message_id = NULL WHERE id = ?", [job])
    async with running_sdbot(config, shared_pool):
        await emu.wait_for(lambda: store.get_job(db, job)["message_id"], 30)
    assert store.get_job(db, job)["message_id"] == posted
    assert len(result_messages(emu, job)) == 1
    # As if it had died before posting: the result is not in the channel, so it is posted.
    await emu.delete_message(posted)
    with db.conn:
        db.execute("UPDATE jobs SET message_id = NULL WHERE id = ?", [job])
    async with running_sdbot(config, shared_pool):
        await emu.wait_for(lambda: len(result_messages(emu, job)) == 1, 30)
        await emu.wait_for(lambda: store.get_job(db, job)["message_id"], 30)
    async with running_sdbot(config, shared_pool):
        await asyncio.sleep(1.0)  # a third start finds nothing left to post
    [again] = result_messages(emu, job)
    assert store.get_job(db, job)["message_id"] == again["id"] != posted


async def test_a_failed_job_is_reported_in_a_new_message(
    emu,  # noqa: F811
    shared_pool,  # noqa: F811
    config,
    tiny_sd,
    tmp_path,
):
    """Queued under the old limits, refused under the new ones: the member is told."""
    async with running_sdbot(config, shared_pool):
        job = await queued_job(await imagine(emu, "too long", steps=150, size="256x256"))
    lowered = make_config(
        tiny_sd, data_dir_for(shared_pool, tmp_path), emu, limits={"max_steps": 10}
    )
    async with running_sdbot(lowered, shared_pool):
        failure = await emu.wait_for(
            lambda: next(
                (m for m in emu.channel_messages(ephemeral=False) if "Failed:" in m["content"]),
                None,
            ),
            60,
        )
    assert failure["content"].startswith(f"<@{emu.alice.id}> **too long**")
    assert failure["content"].endswith("Failed: steps must be between 1 and 10, but is 150")
    assert result_messages(emu, job) == []
    progress_left = [m for m in emu.channel_messages() if f"sdbot:cancel:{job}" in custom_ids(m)]
    assert progress_left == []


async def test_two_members_jobs_interleave_fairly(emu, shared_pool, config):  # noqa: F811
    async with running_sdbot(config, shared_pool):
        alice = [await queued_job(await imagine(emu, f"alice {i}", steps=6)) for i in range(3)]
        bob = await queued_job(await imagine(emu, "bob", user=emu.bob, steps=6))
        for job in [*alice, bob]:
            await wait_result(emu, job)
    order = [
        job
        for m in emu.channel_messages(ephemeral=False)
        for job in [*alice, bob]
        if f"sdbot:info:{job}" in custom_ids(m)
    ]
    # Bob queued last but waits for at most one more of Alice's jobs, not all of them.
    assert order.index(bob) < order.index(alice[2])


async def test_results_over_the_upload_limit_are_reencoded(emu, shared_pool, config):  # noqa: F811
    async with running_sdbot(config, shared_pool):
        record = await emu.send_command(
            "imagine", {"prompt": "noise", "size": "128x128"}, attachment_size_limit=6000
        )
        message = await wait_result(emu, await queued_job(record))
    [attachment] = message["attachments"]
    assert attachment["filename"].endswith(".jpg") and attachment["size"] <= 6000
    assert "re-encoded as JPEG" in message["content"]
    assert Image.open(io.BytesIO(emu.attachment_data(attachment))).format == "JPEG"


async def test_loras_from_the_server_library_and_private_ones(
    emu,  # noqa: F811
    shared_pool,  # noqa: F811
    tiny_sd,
    tmp_path,
):
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    from tests.lycoris_files import write_lora

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    library = tmp_path / "library"
    library.mkdir()
    write_lora(library / "paint.safetensors", pipe, "kohya", seed=1)
    # A file with one layer this model does not have: applied, and the member is told.
    halfway = load_file(str(write_lora(tmp_path / "half.safetensors", pipe, "loha", seed=3)))
    halfway["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(2, 8)
    halfway["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(8, 2)
    save_file(halfway, str(library / "halfway.safetensors"))
    layers = len({key.split(".")[0] for key in halfway})
    private = write_lora(tmp_path / "bobs.safetensors", pipe, "kohya", seed=2).read_bytes()
    config = make_config(
        tiny_sd, data_dir_for(shared_pool, tmp_path), emu, loras={"dir": str(library)}
    )
    db = store.open_db(config.storage.database)
    sha = BlobStore(config.storage.blobs).put(private, ".safetensors")
    store.add_lora(db, owner_id=emu.bob.id, guild_id=emu.guild_id, name="bobs", sha256=sha)
    async with running_sdbot(config, shared_pool):
        painted = await wait_result(
            emu, await queued_job(await imagine(emu, "a cat <lora:paint:0.8>"))
        )
        partly = await wait_result(
            emu, await queued_job(await imagine(emu, "a cat <lora:halfway>"))
        )
        refused = await error_reply(await imagine(emu, "a cat <lora:bobs>"))
        his = await wait_result(
            emu, await queued_job(await imagine(emu, "a cat <lora:bobs>", user=emu.bob))
        )
    [(_, info)] = result_images(emu, painted)
    assert info["Prompt"] == "a cat <lora:paint:0.8>"
    assert info["Lora hashes"].startswith("paint: ")
    assert (
        f"LoRA 'halfway': 1 of {layers} layers do not fit this model and were left out"
        in partly["content"]
    )
    assert refused.startswith("LoRA 'bobs' not found.")
    [(_, bob_info)] = result_images(emu, his)
    assert bob_info["Lora hashes"].startswith("bobs: ")  # A1111's own hash of the file


async def test_several_images_get_a_button_each(emu, shared_pool, config):  # noqa: F811
    async with running_sdbot(config, shared_pool):
        job = await queued_job(await imagine(emu, "two moons", count=2, seed=41))
        message = await wait_result(emu, job)
        varied = await wait_result(
            emu, await queued_job(await emu.click(message, f"sdbot:vary:{job}:1"))
        )
    assert [info["Seed"] for _, info in result_images(emu, message)] == ["41", "42"]
    assert {f"sdbot:vary:{job}:0", f"sdbot:vary:{job}:1", f"sdbot:upscale:{job}:1"} <= set(
        custom_ids(message)
    )
    assert "Seeds 41, 42" in message["content"]
    [(_, info), _] = result_images(emu, varied)  # a variation keeps the job's count
    assert info["Denoising strength"] == "0.6"
