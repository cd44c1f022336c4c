"""/edit jobs on the worker (issue 25): a real photo edited by the tiny edit models, the
person measured by dlib's real recogniser, redrawn when lost.

The photo is scikit-image's astronaut (Eileen Collins, 512²). The tiny models' results
are noise: without `keep` the person is lost on every try (no face, identity 0), so the
job takes exactly 1 + max_retries tries; with `keep: face` the photo's face is put back
over the result, and the person is kept on the first try.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipeline.contract.config import EditConfig
from pipeline.contract.infotext import generation_settings, parse_infotext, read_infotext
from pipeline.contract.jobs import GenerateSpec, JobError
from tests.conftest import level_difference, png_of

SETTINGS = EditConfig(min_identity=0.55, max_retries=2)
WORK = 64  # the tiny models' working size; results come back at the photo's 512²
STEPS = 2


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut()).convert("RGB")


@pytest.fixture(scope="module")
def qwen_edit(tiny_2026):
    from pipeline.contract.config import ModelConfig
    from pipeline.models.loading import load_model

    return load_model(ModelConfig(name="edit", source=str(tiny_2026["qwen-image-edit"])))


def _spec(blobs, photo, **values) -> GenerateSpec:
    base = dict(
        prompt="make her older",
        mode="edit",
        image=blobs.put(png_of(photo)),
        sampler="Euler",
        steps=STEPS,
        cfg_scale=2.0,
        width=WORK,
        height=WORK,
        seed=7,
    )
    return GenerateSpec(**{**base, **values})


def _edit(model, spec, blobs, settings=SETTINGS, on_step=None):
    from pipeline.generate.modes import run_generation

    [images] = run_generation(model, [spec], blobs=blobs, edit=settings, on_step=on_step)
    return images


def _image(output) -> Image.Image:
    return Image.open(io.BytesIO(output.png)).convert("RGB")


@pytest.fixture(scope="module")
def kept(qwen_edit, tmp_path_factory, photo):
    """An edit with keep: face of Collins as face 1, on the tiny Qwen-Image-Edit."""
    from pipeline.contract.blobs import BlobStore

    blobs = BlobStore(tmp_path_factory.mktemp("blobs"))
    [out] = _edit(qwen_edit, _spec(blobs, photo, keep="face", face=1), blobs)
    return out


def test_keep_face_keeps_the_person_on_the_first_try_at_the_photos_size(kept, photo):
    assert kept.identity is not None and kept.identity >= SETTINGS.min_identity
    assert kept.tries == 1 and kept.seed == 7 and kept.input_face
    assert _image(kept).size == photo.size  # the model worked at 64², the photo is 512²
    # The face itself is the photo's (the result is composited around it).
    box = (205, 95, 245, 135)  # inside Collins's face
    assert level_difference(_image(kept).crop(box), photo.crop(box)) == 0
    info = parse_infotext(kept.infotext)
    assert info["Identity"] == f"{kept.identity:.2f}" and info["Edit tries"] == "1"
    assert info["Size"] == "512x512" and info["Edit keep"] == "face"
    assert not any("could not be kept" in n for n in kept.notices)


def test_a_lost_person_is_redrawn_with_the_next_seeds_then_posted_saying_so(
    qwen_edit, blobs, photo
):
    steps: list[tuple[int, int]] = []
    spec = _spec(blobs, photo)
    [out] = _edit(
        qwen_edit, spec, blobs, on_step=lambda done, total, _: steps.append((done, total))
    )
    tries = 1 + SETTINGS.max_retries
    assert out.tries == tries and out.identity is not None
    assert out.identity < SETTINGS.min_identity
    [notice] = [n for n in out.notices if "could not be kept" in n]
    assert notice.startswith("the person could not be kept: seeds 7, 8, 9 scored ")
    assert f"{out.identity:.2f}" in notice and out.seed in (7, 8, 9)
    assert notice.endswith(f"below 0.55; seed {out.seed}'s result is shown")
    assert parse_infotext(out.infotext)["Edit tries"] == str(tries)
    # Progress over the three calls: the step never goes back, the total grows per try.
    assert [d for d, _ in steps] == list(range(1, STEPS * tries + 1))
    assert steps[-1] == (STEPS * tries, STEPS * tries)
    assert all(b[1] >= a[1] for a, b in zip(steps, steps[1:]))
    # The seed posted draws the image posted: the same call alone, without retries.
    alone = _spec(blobs, photo, seed=out.seed)
    [again] = _edit(qwen_edit, alone, blobs, EditConfig(min_identity=0.55, max_retries=0))
    assert again.tries == 1 and level_difference(_image(again), _image(out)) == 0


def test_count_two_retries_never_repeat_another_images_seed(qwen_edit, blobs, photo):
    from pipeline.generate.editing import try_seed

    small = photo.resize((256, 256), Image.Resampling.LANCZOS)
    spec = _spec(blobs, small, count=2, seed=10)
    assert [[try_seed(spec, i, k) for k in range(3)] for i in range(2)] == [
        [10, 12, 14],
        [11, 13, 15],
    ]
    outs = _edit(qwen_edit, spec, blobs, EditConfig(min_identity=0.55, max_retries=1))
    assert [o.tries for o in outs] == [2, 2]
    assert outs[0].seed in (10, 12) and outs[1].seed in (11, 13)
    assert [_image(o).size for o in outs] == [(256, 256)] * 2


def test_no_face_in_the_photo_means_no_measure_and_no_retry(qwen_edit, blobs):
    wall = Image.fromarray(skimage.data.brick()).convert("RGB")
    [plain] = _edit(qwen_edit, _spec(blobs, wall), blobs)
    assert (plain.identity, plain.tries, plain.input_face) == (None, 1, False)
    assert "Identity" not in parse_infotext(plain.infotext)
    assert not any("face" in n for n in plain.notices)
    [kept] = _edit(qwen_edit, _spec(blobs, wall, keep="face"), blobs)
    assert kept.identity is None and kept.tries == 1
    assert any(
        n.startswith("no face found in the photo, so nothing was kept") for n in kept.notices
    )


def test_a_face_number_the_photo_lacks_is_one_line(qwen_edit, blobs, photo):
    with pytest.raises(
        JobError, match=r"^face 2 was asked for, but the photo shows 1 face; pick 1 to 1$"
    ):
        _edit(qwen_edit, _spec(blobs, photo, face=2), blobs)


def test_the_edit_infotext_reads_back(kept):
    settings = generation_settings(kept.infotext)
    assert settings.measured == {
        "Identity": pytest.approx(kept.identity, abs=0.005),
        "Edit tries": 1,
    }
    assert settings.edit == {"face": 1, "keep": "face"}
    assert settings.fields["seed"] == 7 and settings.fields["steps"] == STEPS
    # What an edit measured is never "not re-run"; its own settings are, outside an edit.
    assert sorted(settings.not_applied) == ["Edit face: 1", "Edit keep: face"]


def test_edit_specs_refuse_nonsense_in_one_line() -> None:
    from pipeline.contract.jobs import Limits

    with pytest.raises(JobError, match=r"^edit needs an instruction: say what to change"):
        GenerateSpec("  ", mode="edit", image="a" * 64).check(Limits())
    with pytest.raises(JobError, match=r"^edit takes no mask; keep: face or keep: background"):
        GenerateSpec("older", mode="edit", image="a" * 64, mask="b" * 64).check(Limits())
    GenerateSpec("older", mode="edit", image="a" * 64, keep="face", face=2).check(Limits())


def test_the_classic_route_on_sd_keeps_the_face_by_inpainting(sd, blobs, photo):
    spec = _spec(blobs, photo, keep="face", sampler="Euler a", steps=3)
    [out] = _edit(sd, spec, blobs)
    assert _image(out).size == photo.size and out.tries == 1
    assert out.identity is not None and out.identity >= SETTINGS.min_identity
    info = parse_infotext(out.infotext)
    assert info["Edit route"] == "classic inpaint" and info["Denoising strength"] == "0.75"
    assert any("edited by the classic route" in n for n in out.notices)
    box = (205, 95, 245, 135)
    assert level_difference(_image(out).crop(box), photo.crop(box)) <= 2
    # Without keep: the instruction as an img2img prompt, mapped back to the photo's size.
    [loose] = _edit(sd, _spec(blobs, photo, steps=3), blobs, EditConfig(max_retries=0))
    assert _image(loose).size == photo.size
    assert parse_infotext(loose.infotext)["Edit route"] == "classic img2img"
    assert np.asarray(_image(loose)).std() > 0


def test_sdbot_edit_prints_identity_and_tries(sd, tiny_sd, tmp_path, photo, capsys):
    from bot.cli import main

    (tmp_path / "config.toml").write_text(
        f'[models.tiny]\nsource = "{tiny_sd}"\n[defaults]\nsteps = 2\nwidth = 64\nheight = 64\n'
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[edit]\nmax_retries = 1\n'
    )
    photo.save(tmp_path / "me.png")
    config = ["--config", str(tmp_path / "config.toml")]
    out = tmp_path / "older.png"
    args = ["edit", str(tmp_path / "me.png"), "make her older", "--keep", "face", "--seed", "3"]
    assert main([*config, *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    line = printed.splitlines()[0]
    assert line.startswith(f"{out}  seed 3  identity 0.") and line.endswith("  1 try")
    assert "note: SD 1.x has no instruction-editing model" in printed
    assert Image.open(out).size == photo.size
    # Bad input: one line, nothing runs.
    assert main([*config, "edit", str(tmp_path / "me.png"), ""]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: edit needs an instruction: say what to change, e.g. 'make it night'"
    )
    # The member's LoRA applies to the edit, and the infotext says so as A1111 does.
    from tests.lycoris_files import write_lora

    (tmp_path / "loras").mkdir()
    write_lora(tmp_path / "loras" / "Me.safetensors", sd.pipe, "kohya", seed=3)
    lora = ["--lora", "Me:0.7", "--lora-dir", str(tmp_path / "loras")]
    assert main([*config, *args, *lora, "--out", str(tmp_path / "me-lora.png")]) == 0
    capsys.readouterr()
    info = parse_infotext(read_infotext((tmp_path / "me-lora.png").read_bytes()))
    assert info["Prompt"] == "make her older <lora:Me:0.7>"
    assert info["Lora hashes"].startswith("Me: ")
    assert level_difference(Image.open(tmp_path / "me-lora.png"), Image.open(out)) > 0
    assert main([*config, *args, "--image2", str(tmp_path / "me.png")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: SD 1.x models edit with at most 1 input image; this job gave 2"
    )


def test_the_runner_follows_the_configs_edit_settings(tiny_2026, tmp_path, photo):
    """The worker's path: `[edit] max_retries` from config.toml reaches the job, and the
    Done event carries each image's identity, tries and input face."""
    from pipeline.contract.blobs import BlobStore
    from pipeline.contract.config import config_from_dict
    from pipeline.contract.jobs import Done, Progress
    from pipeline.workers.runner import Runner

    config = config_from_dict(
        {
            "models": {"edit": {"source": str(tiny_2026["qwen-image-edit"])}},
            "storage": {"data_dir": str(tmp_path / "data")},
            "edit": {"min_identity": 0.55, "max_retries": 1},
        }
    )
    blobs = BlobStore(config.storage.blobs)
    small = photo.resize((256, 256), Image.Resampling.LANCZOS)
    spec = _spec(blobs, small, model="edit")
    events: list = []
    Runner(config, device="cpu", blobs=blobs, name="w").run(
        [("job", spec)], events.append, lambda job_id: False
    )
    [done] = [e for e in events if isinstance(e, Done)]
    [image] = done.images
    assert (image.tries, image.input_face) == (2, True)
    assert image.identity is not None and image.identity < 0.55
    steps = [e.step for e in events if isinstance(e, Progress)]
    assert steps == sorted(steps) and steps[-1] == 2 * STEPS


def test_face_n_counts_the_photos_faces_from_the_left(photo):
    """Two real people side by side: face 1 is the left one, face 2 the right one, 0 the
    largest; `keep` keeps only the face named (every face when none is)."""
    from pipeline.faces import identity
    from pipeline.faces.detection import detect_faces
    from pipeline.generate.editing import person_of

    canvas = Image.new("RGB", (1024, 512))
    canvas.paste(Image.fromarray(skimage.data.camera()).convert("RGB"), (0, 0))
    canvas.paste(photo, (512, 0))  # Collins on the right
    largest = detect_faces(canvas)
    assert len(largest) == 2
    people = {n: person_of(canvas, GenerateSpec("x", mode="edit", face=n)) for n in (0, 1, 2)}
    assert people[1].reference.box.x1 <= 512 <= people[2].reference.box.x
    assert people[0].reference.box == largest[0] and people[0].kept == largest
    assert [p.kept for p in (people[1], people[2])] == [
        [people[1].reference.box],
        [people[2].reference.box],
    ]
    assert identity.identity_score(people[2].reference, photo).score >= SETTINGS.min_identity
    assert identity.identity_score(people[1].reference, photo).score < 0.5


def test_a_large_photo_is_measured_on_a_copy_of_at_most_1024(photo):
    from pipeline.faces import identity
    from pipeline.generate.editing import MEASURE_MAX_SIDE, measurable, person_of

    large = photo.resize((2048, 2048), Image.Resampling.LANCZOS)
    person = person_of(large, GenerateSpec("x", mode="edit"))
    # The keep masks work in the photo's pixels, the descriptor on the copy's.
    assert person.kept[0].x1 > MEASURE_MAX_SIDE
    assert person.reference.box == person.kept[0].scaled(0.5)
    copy, factor = measurable(large)
    assert copy.size == (1024, 1024) and factor == 0.5
    assert identity.identity_score(person.reference, copy).score >= 0.9


def test_which_families_edit_and_how() -> None:
    from pipeline.contract import families
    from pipeline.contract.families.flux import VARIANTS
    from pipeline.contract.jobs import MODES

    for name in ("sd1", "sdxl"):  # the classic route; their pipelines' modes unchanged
        spec = families.spec(name)
        assert spec.has_mode("edit") and spec.edit_route == "classic"
        assert set(spec.modes) == set(MODES)
        spec.check_mode("edit")
    for name in ("qwen-image-edit", "qwen-image-edit-plus", "flux2-klein"):
        assert families.spec(name).has_mode("edit")
        assert families.spec(name).edit_route == "model"
    assert VARIANTS["kontext"].has_mode("edit") and not VARIANTS["dev"].has_mode("edit")
    registers = {n for n in families.FAMILIES if families.spec(n).edit_registers}
    assert registers == {"qwen-image-edit", "qwen-image-edit-plus"}
    with pytest.raises(JobError, match=r"^Flux.1 models cannot edit; modes: "):
        VARIANTS["dev"].check_mode("edit")


def test_face_fix_runs_on_the_edit_before_it_is_measured(sd, blobs, photo):
    steps: list[tuple[int, int]] = []
    spec = _spec(blobs, photo, sampler="Euler a", steps=3, keep="face", face_fix=True)
    [out] = _edit(sd, spec, blobs, EditConfig(max_retries=0), lambda d, t, _: steps.append((d, t)))
    assert parse_infotext(out.infotext)["ADetailer model"] == "haarcascade face"
    assert out.identity is not None and _image(out).size == photo.size
    # The kept face was repainted by the face fix after the edit (keep alone leaves it).
    box = (205, 95, 245, 135)
    assert level_difference(_image(out).crop(box), photo.crop(box)) > 2
    # Two calls (the edit's inpaint, then the face's), counted as one job's steps.
    assert [d for d, _ in steps] == list(range(1, len(steps) + 1)) and len(steps) > 2
    assert all(b[1] >= a[1] for a, b in zip(steps, steps[1:]))
