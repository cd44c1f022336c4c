"""/edit end to end: the real bot against the emulator, the real worker running the tiny
Qwen-Image-Edit-Plus model ("edit" in the shared pool), the real photo helper (faces,
NudeNet). Nothing is mocked.

The identity score is measured in the worker (issue 25's worker side); how a result row
that carries it reads is checked through the render functions. The rule for flagged edits
of a real person is checked end to end on results delivered after a restart (the bot's
path for results that finished while it was down): their rows are written as the
dispatcher writes them, with a real photo as the result and the real detector's scores;
`safety.labels FACE_FEMALE=0.5` (a per-server setting, not a fake) makes her face count
as flagged, as tests/test_bot_safety.py does.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from bot import store
from bot.services.safety import Verdict
from bot.views import render
from bot.views.buttons import result_view
from pipeline.contract.blobs import BlobStore
from pipeline.contract.config import ConfigError, config_from_dict
from pipeline.contract.families import family_of_model
from pipeline.contract.jobs import GenerateSpec, spec_to_dict
from pipeline.safety.detector import detect_png
from tests.botkit import *  # noqa: F403 - the end-to-end kit (botkit.__all__)
from tests.discord_rules import check_message_body

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

SIZE = 160  # the face detector finds the astronaut's face from about this size
INSTRUCTION = "give her a red scarf"


def astronaut(size: int = SIZE) -> bytes:
    return png_bytes(Image.fromarray(photos.astronaut()).resize((size, size), Image.LANCZOS))


def coffee() -> bytes:  # a real photo without a face
    return png_bytes(Image.fromarray(photos.coffee()).resize((128, 96), Image.LANCZOS))


@pytest.fixture
def edit_config(emu, shared_pool, tiny_sd, tiny_edit, tmp_path):  # noqa: F811
    """The tiny SD model, the tiny editing model (the default for /edit), and two models
    declared as families that take fewer photos ("single": Qwen-Image-Edit, one photo)
    or cannot edit ("plain": Z-Image); those two are refused before anything runs."""
    edit = str(tiny_edit)
    return make_config(
        tiny_sd,
        data_dir_for(shared_pool, tmp_path),
        emu,
        models={
            "edit": {"source": edit},
            "single": {"source": edit, "family": "qwen-image-edit"},
            "plain": {"source": edit, "family": "zimage"},
        },
        edit={"default_model": "edit"},
    )


async def edit(emu, image: bytes, instruction: str = INSTRUCTION, user=None, **options):  # noqa: F811
    options = {"image": attach(emu, image, "photo.png"), "instruction": instruction, **options}
    return await emu.send_command("edit", options, user=user)


async def admin_set(emu, key: str, value: str) -> str:  # noqa: F811
    answer = await reply(
        await emu.send_command(
            "admin", {"key": key, "value": value}, subcommand="settings", user=emu.admin
        )
    )
    assert "is now" in answer["content"], answer["content"]
    return answer["content"]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


async def test_edit_posts_a_result_with_compare_and_reroll(
    emu,  # noqa: F811
    shared_pool,  # noqa: F811
    edit_config,
):
    config = edit_config
    second = photo((96, 96), (200, 40, 40))
    async with running_sdbot(config, shared_pool):
        offered = await emu.send_autocomplete("edit", {"instruction": "x", "model": ""}, "model")
        record = await edit(
            emu, astronaut(), image2=attach(emu, second, "scarf.png"), seed=11, keep="none"
        )
        assert record.deferred and record.ephemeral
        job = await queued_job(record)
        message = await wait_result(emu, job)
        compared = await reply(await emu.click(message, f"sdbot:compare:{job}"))
        not_theirs = await reply(await emu.click(message, f"sdbot:compare:{job}", user=emu.bob))
        info = await reply(await emu.click(message, f"sdbot:info:{job}"))
        bobs_reroll = await error_reply(
            await emu.click(message, f"sdbot:reroll:{job}", user=emu.bob)
        )
        rerolled = await queued_job(await emu.click(message, f"sdbot:reroll:{job}"))
        again = await wait_result(emu, rerolled)
        db = store.open_db(config.storage.database)
        first_spec, reroll_spec = (store.get_job(db, j)["spec"] for j in (job, rerolled))
        db.close()

    # Autocomplete offers the models whose family edits (asked of the registry: an edit
    # model, or an SD model by the classic route), no other.
    editing = {m.name for m in config.models if family_of_model(m).has_mode("edit")}
    assert {c["value"] for c in offered} == editing and {"edit", "single", "tiny"} <= editing
    # The result: the photo's size, the instruction, the buttons of every result + Compare.
    assert f"<@{emu.alice.id}>" in message["content"] and INSTRUCTION in message["content"]
    assert "edit" in message["content"] and "11" in message["content"]
    ids = set(custom_ids(message))
    for action in ("reroll", "vary", "info", "delete", "compare"):
        assert f"sdbot:{action}:{job}" in ids, ids
    [(result, infotext)] = result_images(emu, message)
    assert result.size == (SIZE, SIZE)
    assert infotext["Prompt"] == INSTRUCTION and infotext["Seed"] == "11"
    assert first_spec["mode"] == "edit" and first_spec["model"] == "edit"
    assert len(first_spec["images"]) == 1 and first_spec["keep"] is None
    # Compare: ephemeral, the photo on the left and the result on the right, exactly
    # (PNG both ways, same height: within 1 level).
    assert compared["flags"] & 64 and f"Job `{job}`" in compared["content"]
    [attachment] = compared["attachments"]
    picture = Image.open(io.BytesIO(emu.attachment_data(attachment)))
    assert picture.width == 2 * SIZE + 8 and picture.height > SIZE
    before = Image.open(io.BytesIO(astronaut()))
    assert np.abs(pixels(picture.crop((0, 0, SIZE, SIZE))) - pixels(before)).max() <= 1
    right = picture.crop((SIZE + 8, 0, 2 * SIZE + 8, SIZE))
    assert np.abs(pixels(right) - pixels(result)).max() <= 1
    assert "Only the member who asked for this edit" in not_theirs["content"]
    assert not not_theirs["attachments"]
    assert INSTRUCTION in info["content"]
    # Nobody else gets the member's photo: Compare and Reroll are theirs (and admins').
    assert bobs_reroll.startswith("Only the member who asked for this edit can reroll it")
    # Reroll: the same edit of the same photos with a new seed.
    assert {k: v for k, v in reroll_spec.items() if k != "seed"} == {
        k: v for k, v in first_spec.items() if k != "seed"
    }
    assert reroll_spec["seed"] != first_spec["seed"]
    assert "sdbot:compare:" + rerolled in custom_ids(again)


async def test_bad_edits_are_refused_in_one_line_and_queue_nothing(
    emu,  # noqa: F811
    shared_pool,  # noqa: F811
    edit_config,
):
    config = edit_config
    plain = photo((96, 96))
    async with running_sdbot(config, shared_pool):
        db = store.open_db(config.storage.database)
        refusals = {
            "empty": await error_reply(await edit(emu, plain, instruction="   ")),
            "no face": await error_reply(await edit(emu, coffee(), keep="face")),
            "face 2": await error_reply(await edit(emu, astronaut(), face=2)),
            "images": await error_reply(
                await edit(emu, plain, model="single", image2=attach(emu, plain, "b.png"))
            ),
            "too large": await error_reply(
                await emu.send_command(
                    "edit",
                    {
                        "image": attach(emu, plain, "huge.png", size=40 * 1024 * 1024),
                        "instruction": INSTRUCTION,
                    },
                )
            ),
            "not an image": await error_reply(
                await emu.send_command(
                    "edit",
                    {
                        "image": attach(emu, b"a note", "notes.txt", content_type="text/plain"),
                        "instruction": INSTRUCTION,
                    },
                )
            ),
            "cannot edit": await error_reply(await edit(emu, plain, model="plain")),
        }
        # Every photo of an edit is an input: a flagged second photo is refused here.
        await admin_set(emu, "safety.labels", "FACE_FEMALE=0.5")
        refusals["flagged"] = await error_reply(
            await edit(emu, plain, image2=attach(emu, astronaut(128), "b.png"))
        )
        # No model that edits on this server.
        await admin_set(emu, "models.allowed", "plain")
        refusals["no model"] = await error_reply(await edit(emu, plain))
        jobs = store.user_jobs(db, emu.alice.id, limit=100)
        db.close()

    assert refusals["empty"].startswith("The instruction is empty")
    assert refusals["no face"].startswith("No face found in the photo, so keep: face")
    assert refusals["face 2"].startswith("The photo shows 1 face, so there is no face 2")
    assert refusals["images"] == (
        "Qwen-Image-Edit models edit with at most 1 input image; this job gave 2"
    )
    assert "40.0 MB; the limit is 10 MB" in refusals["too large"]
    assert "text/plain, not an image" in refusals["not an image"]
    assert refusals["cannot edit"].startswith("The model plain cannot edit photos")
    assert "flagged as explicit" in refusals["flagged"] and "FACE_FEMALE" in refusals["flagged"]
    assert refusals["no model"].startswith("No model on this server can edit photos")
    for line in refusals.values():
        assert "\n" not in line and len(line) < 250, line
    assert jobs == []  # nothing was queued


def finished_edit(config, db, emu, channel: str, result_png: bytes, *, input_face: bool) -> str:
    """A finished /edit job whose result was never posted (the bot was down), written as
    the dispatcher writes one; the result image is a real photo with the real detector's
    scores."""
    blobs = BlobStore(config.storage.blobs)
    photo_sha = blobs.put(astronaut(), ".png")
    spec = GenerateSpec(prompt=INSTRUCTION, mode="edit", model="edit", image=photo_sha, seed=3)
    row = store.enqueue(
        db,
        user_id=str(emu.alice.id),
        guild_id=emu.guild_id,
        channel_id=channel,
        kind="generate",
        spec=spec_to_dict(spec),
    )
    store.set_job_context(db, row["id"], nsfw_channel=True, dm=False)
    image = {
        "sha256": blobs.put(result_png, ".png"),
        "seed": 3,
        "infotext": "",
        "notices": [],
        "nsfw": detect_png(result_png),
        "identity": 0.91,
        "tries": 1,
        "input_face": input_face,
    }
    store.finish(db, row["id"], {"images": [image], "files": [], "info": {}})
    return row["id"]


async def test_flagged_edits_of_a_real_person_are_withheld_until_an_admin_allows_them(
    emu,  # noqa: F811
    shared_pool,  # noqa: F811
    edit_config,
):
    adults = emu.add_channel("adults-only", nsfw=True)
    config = edit_config
    result = astronaut(128)  # her face stays in the "edited" result
    db = store.open_db(config.storage.database)
    async with running_sdbot(config, shared_pool):
        await admin_set(emu, "safety.labels", "FACE_FEMALE=0.5")
    person = finished_edit(config, db, emu, adults, result, input_face=True)
    no_person = finished_edit(config, db, emu, adults, result, input_face=False)
    async with running_sdbot(config, shared_pool):
        withheld = emu.get_message(
            await emu.wait_for(lambda: store.get_job(db, person)["message_id"], timeout=60)
        )
        posted = emu.get_message(
            await emu.wait_for(lambda: store.get_job(db, no_person)["message_id"], timeout=60)
        )
        await admin_set(emu, "edit.allow_nsfw_real_faces", "true")
        audit = await reply(await emu.send_command("admin", {}, subcommand="audit", user=emu.admin))
    allowed = finished_edit(config, db, emu, adults, result, input_face=True)
    async with running_sdbot(config, shared_pool):
        allowed_post = emu.get_message(
            await emu.wait_for(lambda: store.get_job(db, allowed)["message_id"], timeout=60)
        )
    scores = store.get_job(db, person)["result"]["images"][0]["nsfw"]
    db.close()

    assert scores["FACE_FEMALE"] >= 0.5  # flagged by the real detector under this setting
    # In an age-restricted channel, a flagged edit of a real person is still withheld...
    assert withheld["channel_id"] == adults and withheld["attachments"] == []
    assert "photo shows a real person" in withheld["content"]
    # The same result without a real face in the photo is posted, as the channel allows.
    assert [a["filename"] for a in posted["attachments"]] == [f"sdbot-{no_person}-3.png"]
    assert "identity 0.91" in posted["content"]  # the score the worker measured
    # The admin's switch, recorded in the audit log, lets it through on this server.
    assert "edit.allow_nsfw_real_faces = `True`" in audit["content"]
    assert [a["filename"] for a in allowed_post["attachments"]] == [f"sdbot-{allowed}-3.png"]
    assert "withheld" not in allowed_post["content"]
    assert "sdbot:compare:" + allowed in custom_ids(allowed_post)


async def test_the_identity_score_reads_as_members_see_it():
    """Result rows as the dispatcher stores them once the worker measured identity."""
    spec = {"mode": "edit", "prompt": INSTRUCTION}
    kept = {"identity": 0.934, "tries": 1, "input_face": True}
    retried = {"identity": 0.81, "tries": 2, "input_face": True}
    lost = {"identity": 0.41, "tries": 3, "input_face": True}
    faceless = {"identity": None, "tries": 3, "input_face": True}
    no_face_in_photo = {"identity": None, "tries": 1, "input_face": False}

    assert render.edit_scores(spec, [kept], 0.55) == "identity 0.93"
    assert render.edit_scores(spec, [retried], 0.55) == "identity 0.81 (2 tries)"
    assert render.edit_scores(spec, [lost], 0.55) == (
        "identity 0.41 after 3 tries: the person could not be kept"
    )
    assert render.edit_scores(spec, [no_face_in_photo], 0.55) == ""
    assert render.edit_scores(spec, [kept, faceless], 0.55) == (
        "1: identity 0.93 · 2: no face in the result after 3 tries: the person could not be kept"
    )
    assert render.edit_scores({"mode": "img2img"}, [kept], 0.55) == ""
    text = render.result_text(
        "1", "ab12", spec, [dict(kept, seed=5)], render.edit_scores(spec, [kept], 0.55)
    )
    assert text.splitlines()[-1] == "identity 0.93"
    # Compare sits with Info and Delete, or per image (C1…) under several results.
    one = [c.custom_id for c in result_view("ab12", 1, compare=True).children]
    four = [c.custom_id for c in result_view("ab12", 4, compare=True).children]
    assert "sdbot:compare:ab12" in one
    assert [i for i in four if i.startswith("sdbot:compare:")] == [
        f"sdbot:compare:ab12:{i}" for i in range(4)
    ]
    assert not [c for c in result_view("ab12", 1).children if "compare" in c.custom_id]
    for count in (1, 2, 4):  # within Discord's documented rules (5 rows of 5 buttons)
        view = result_view("ab12", count, compare=True)
        check_message_body({"content": "x", "components": view.to_components()})
    # A withheld edit of a real person is not sent privately either (blocked_ephemeral),
    # while the policy's other withheld images still are.
    verdict = Verdict(flagged={0: ["FACE_FEMALE"], 1: ["FACE_FEMALE"]}, action="block")
    verdict.real_faces = {0}
    assert verdict.blocked == {0, 1} and verdict.private == {1}
    assert "1 of 2 image(s) withheld: flagged NSFW by the detector, and the photo" in verdict.note(
        2
    )


async def test_the_default_editing_model_must_be_configured():
    with pytest.raises(ConfigError, match="edit.default_model 'nope' is not a configured model"):
        config_from_dict({"models": {"m": {"source": "x"}}, "edit": {"default_model": "nope"}})
