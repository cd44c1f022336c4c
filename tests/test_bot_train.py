"""End to end: /train and /lora through the emulator, with a real worker training on the
tiny model. Personal models, their privacy, and one GPU shared with generation."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from bot import store
from pipeline.contract.blobs import BlobStore
from tests.botkit import *  # noqa: F403 - the end-to-end kit (botkit.__all__)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(900)]
TRAIN_ID = re.compile(r"Queued training `([0-9a-f]+)`")
TRAIN_TIMEOUT = 400.0


@pytest.fixture
def config(emu, shared_pool, tiny_sd, tmp_path):  # noqa: F811
    return make_config(
        tiny_sd,
        data_dir_for(shared_pool, tmp_path),
        emu,
        training={"resolution": 64, "min_side": 64, "chunk_steps": 2},
    )


def jpeg(name: str, size: int = 256) -> bytes:
    image = Image.fromarray(getattr(photos, name)()).resize((size, size), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def photo_options(emulator, names=("astronaut", "coffee", "chelsea", "rocket")) -> dict:
    attachments = {}
    for i, name in enumerate(names, start=1):
        attachments[f"photo{i}"] = emulator.add_attachment(jpeg(name), f"{name}.jpg", "image/jpeg")
    return attachments


async def train(emulator, name: str, user=None, steps: int = 2, extra: dict | None = None):
    options = {"name": name, "steps": steps, **(extra or {})}
    return await emulator.send_command(
        "train", options, user=user, attachments=photo_options(emulator)
    )


def training_results(emulator, user_id: str) -> list[dict]:
    return [
        m
        for m in emulator.channel_messages(ephemeral=False)
        if "is ready" in m["content"] and f"<@{user_id}>" in m["content"]
    ]


async def test_train_reports_the_dataset_trains_registers_and_deletes_photos(
    emu,
    shared_pool,
    config,  # noqa: F811
):
    text_file = emu.add_attachment(b"not a photo", "notes.txt", "text/plain")
    async with running_sdbot(config, shared_pool):
        record = await emu.send_command(
            "train",
            {"name": "me", "steps": 20, "subject": "woman"},
            user=emu.alice,
            attachments={**photo_options(emu), "photo5": text_file},
        )
        answer = (await reply(record))["content"]
        assert record.ephemeral
        assert "Accepted 4 photo(s) (1 with a face found)." in answer
        assert "notes.txt" in answer  # rejected, with its reason
        job = TRAIN_ID.search(answer).group(1)
        [message] = await emu.wait_for(lambda: training_results(emu, emu.alice.id), TRAIN_TIMEOUT)
        db = store.open_db(config.storage.database)
        row = store.get_job(db, job)
        lora = store.find_lora(db, "me", user_id=emu.alice.id, guild_id=emu.guild_id)
        # The /imagine lora option offers it by autocomplete and adds the tag.
        offered = await emu.send_autocomplete("imagine", {"prompt": "x", "lora": "m"}, "lora")
        picked = await wait_result(
            emu, await queued_job(await imagine(emu, "a portrait", lora="me", seed=5))
        )
        # <lora:me:1> changes the image; the same seed without it does not.
        with_lora = await wait_result(
            emu,
            await queued_job(
                await imagine(emu, f"photo of {lora['token']} woman <lora:me:1>", seed=5)
            ),
        )
        without = await wait_result(
            emu, await queued_job(await imagine(emu, f"photo of {lora['token']} woman", seed=5))
        )
    assert "Held-out loss: base" in message["content"]
    assert "<lora:me:0.8>" in message["content"]
    # Every sample image is posted (Discord shows up to 4 attachments as a mosaic).
    samples = message["attachments"]
    assert [a["filename"] for a in samples] == [f"me-sample-{i}.png" for i in (1, 2, 3, 4)]
    assert all(Image.open(io.BytesIO(emu.attachment_data(a))).size[0] >= 64 for a in samples)
    assert lora["method"] == "lora" and lora["job_id"] == job and lora["size_bytes"] > 0
    blobs = BlobStore(config.storage.blobs)
    assert lora["sha256"] and blobs.exists(lora["sha256"])
    spec = row["spec"]
    assert spec["photos"] and not any(blobs.exists(s) for s in spec["photos"] + spec["test_photos"])
    [(a, info)] = result_images(emu, with_lora)
    [(b, _)] = result_images(emu, without)
    assert info["Lora hashes"].startswith("me: ")
    assert [c["value"] for c in offered] == ["me"]
    [(_, picked_info)] = result_images(emu, picked)
    assert picked_info["Prompt"] == "a portrait <lora:me:0.8>"
    assert picked_info["Lora hashes"].startswith("me: ")
    # 20 steps from a zero-initialised LoRA move the image a little, but they move it.
    assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() > 0


async def test_a_private_lora_is_invisible_to_other_members(emu, shared_pool, config):  # noqa: F811
    async with running_sdbot(config, shared_pool):
        answer = (await reply(await train(emu, "secret")))["content"]
        assert TRAIN_ID.search(answer), answer
        await emu.wait_for(lambda: training_results(emu, emu.alice.id), TRAIN_TIMEOUT)
        refused = await error_reply(await imagine(emu, "a cat <lora:secret:1>", user=emu.bob))
        info = await reply(
            await emu.send_command("lora", {"name": "secret"}, subcommand="info", user=emu.bob)
        )
        delete = await reply(
            await emu.send_command("lora", {"name": "secret"}, subcommand="delete", user=emu.bob)
        )
        listing = await reply(await emu.send_command("lora", {}, subcommand="list", user=emu.bob))
        # The owner shares it: now bob may use it, but still not delete it.
        shared = await reply(
            await emu.send_command(
                "lora", {"name": "secret", "shared": True}, subcommand="share", user=emu.alice
            )
        )
        used = await queued_job(await imagine(emu, "a cat <lora:secret:1>", user=emu.bob))
        still = await reply(
            await emu.send_command("lora", {"name": "secret"}, subcommand="delete", user=emu.bob)
        )
        exported = await reply(
            await emu.send_command("lora", {"name": "secret"}, subcommand="export", user=emu.alice)
        )
        renamed = await reply(
            await emu.send_command(
                "lora", {"name": "secret", "new_name": "mine"}, subcommand="rename", user=emu.alice
            )
        )
        gone = await reply(
            await emu.send_command("lora", {"name": "mine"}, subcommand="delete", user=emu.alice)
        )
    assert "LoRA 'secret' not found" in refused
    assert "no LoRA named 'secret'" in info["content"]
    assert "no LoRA named 'secret'" in delete["content"]
    assert "secret" not in listing["content"]
    assert "shared with this server" in shared["content"] and used
    assert "not yours" in still["content"]
    assert exported["attachments"][0]["filename"] == "secret.safetensors"
    assert "Renamed 'secret' to 'mine'" in renamed["content"]
    assert "Deleted 'mine'" in gone["content"]
    db = store.open_db(config.storage.database)
    assert store.list_loras(db, emu.alice.id, emu.guild_id) == []


async def test_generation_runs_while_a_long_training_job_holds_the_only_worker(
    emu,
    shared_pool,
    config,  # noqa: F811
):
    async with running_sdbot(config, shared_pool):
        answer = (await reply(await train(emu, "long", steps=400)))["content"]
        job = TRAIN_ID.search(answer).group(1)
        db = store.open_db(config.storage.database)
        await emu.wait_for(lambda: store.get_job(db, job)["status"] == "running", 120)
        image_job = await queued_job(await imagine(emu, "a red fox", user=emu.bob))
        result = await wait_result(emu, image_job)
        training = store.get_job(db, job)
        cancelled = await reply(await emu.send_command("cancel", {"job": job}))
        await emu.wait_for(lambda: store.get_job(db, job)["status"] == "cancelled", 120)
    # The image arrived while the training job was still unfinished (paused or running).
    assert training["status"] in ("queued", "running")
    assert result_images(emu, result)
    assert "Stopping" in cancelled["content"] or "Cancelled" in cancelled["content"]
    blobs = BlobStore(config.storage.blobs)
    spec = store.get_job(db, job)["spec"]
    assert not any(blobs.exists(s) for s in spec["photos"] + spec["test_photos"])


async def test_train_refuses_too_few_photos_and_a_taken_name(emu, shared_pool, config):  # noqa: F811
    async with running_sdbot(config, shared_pool):
        few = await emu.send_command(
            "train",
            {"name": "few"},
            attachments={"photo1": emu.add_attachment(jpeg("coffee"), "coffee.jpg", "image/jpeg")},
        )
        text = await error_reply(few)
        db = store.open_db(config.storage.database)
        store.add_lora(
            db, owner_id=emu.alice.id, guild_id=emu.guild_id, name="taken", sha256="a" * 64
        )
        taken = await error_reply(await train(emu, "taken"))
        # The bot keeps serving.
        assert await queued_job(await imagine(emu, "a cat"))
    assert "only 1 usable photo (need at least 3)" in text.lower()
    assert "You already have a LoRA named 'taken'" in taken
    assert store.user_jobs(db, emu.alice.id, statuses=["queued", "running", "done"])
