"""The Runner on the tiny model, in this process: events, batching, failures, cancel.

Also home of the helpers the pool and dispatcher tests share: the tiny model folders
(written once per session) and a config pointing at them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from pipeline.contract.blobs import BlobStore
from pipeline.contract.config import Config, config_from_dict
from pipeline.contract.jobs import Done, Event, Failed, GenerateSpec, Progress, Started
from tests.conftest import BATCH_TOLERANCE_LEVELS, level_difference

_MODELS: dict[str, Path] = {}


def tiny_models(root: Path) -> dict[str, Path]:
    """{"tiny": a working tiny model, "broken": one that fails inside the pipeline call}.

    The broken copy's tokenizer gives <|startoftext|> an id past the text encoder's
    embedding table: the model loads fine, and every prompt then fails deep inside
    transformers (IndexError), as a real corrupt download would.
    """
    if not _MODELS:
        from pipeline.families.sd_tiny import write_tiny_model

        tiny = write_tiny_model(root / "tiny")
        broken = root / "broken"
        shutil.copytree(tiny, broken)
        path = broken / "tokenizer" / "tokenizer.json"
        data = json.loads(path.read_text())
        data["added_tokens"][0]["id"] = 5000
        data["model"]["vocab"]["<|startoftext|>"] = 5000
        path.write_text(json.dumps(data))
        _MODELS.update(tiny=tiny, broken=broken)
    return _MODELS


@contextlib.contextmanager
def one_cpu_thread_per_worker() -> Iterator[None]:
    """Workers spawned meanwhile use one torch thread. The test machine's few cores are
    shared, and OpenMP threads that spin-wait for a descheduled sibling make a 50 ms
    job take seconds. (Ray does the same for its workers by default.)"""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = before


def make_config(models: dict[str, Path], data_dir: Path, **workers: object) -> Config:
    return config_from_dict(
        {
            "models": {name: {"source": str(path)} for name, path in models.items()},
            "storage": {"data_dir": str(data_dir)},
            "workers": {"backend": "local", "devices": ["cpu"], **workers},
        }
    )


def small(prompt: str = "a photo of a cat", **fields: object) -> GenerateSpec:
    values: dict = {"width": 64, "height": 64, "steps": 4, "seed": 7, **fields}
    return GenerateSpec(prompt=prompt, **values)


def slow(**fields: object) -> GenerateSpec:
    """A job that takes about a second on a CPU: long enough to cancel or kill midway."""
    return small(width=256, height=256, steps=120, **fields)


def kinds(events: list[Event], job_id: str | None = None) -> list[str]:
    return [type(e).__name__ for e in events if job_id is None or e.job_id == job_id]


def assert_streamed(events: list[Event], job_id: str, last: str = "Done") -> None:
    """Started, then Progress (how many depends on speed: they are throttled), then `last`."""
    names = kinds(events, job_id)
    assert names[0] == "Started" and names[-1] == last, names
    assert set(names[1:-1]) == {"Progress"}, names


def png_size(png: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image.size


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory):
    from pipeline.workers.runner import Runner

    models = tiny_models(tmp_path_factory.getbasetemp() / "models")
    config = make_config(models, tmp_path_factory.mktemp("data"))
    runner = Runner(config, device="cpu", blobs=BlobStore(config.storage.blobs), name="test")
    runner.warm_up()
    return runner


def run(runner, batch, cancelled=frozenset()) -> list[Event]:
    events: list[Event] = []
    runner.run(batch, events.append, lambda job_id: job_id in cancelled)
    return events


# -- tests --------------------------------------------------------------------------------------


def test_txt2img_streams_started_progress_done_with_a_png(runner) -> None:
    events = run(runner, [("a", small(width=96, height=64))])
    assert isinstance(events[0], Started) and events[0].worker == "test"
    assert isinstance(events[-1], Done)
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress and progress[-1].step == progress[-1].total == 4
    (image,) = events[-1].images
    assert png_size(image.png) == (96, 64)
    assert image.seed == 7 and "Seed: 7" in image.infotext


def test_compatible_jobs_share_a_batch_and_each_gets_its_images(runner) -> None:
    alone = run(runner, [("x", small(seed=11))])[-1]
    events = run(runner, [("x", small(seed=11)), ("y", small(seed=12, count=2))])
    assert_streamed(events, "x")
    assert_streamed(events, "y")
    done = {e.job_id: e for e in events if isinstance(e, Done)}
    assert [i.seed for i in done["y"].images] == [12, 13]
    # Seeded per image: a job draws the same picture alone or in a batch (up to BLAS
    # rounding on other batch shapes; see BATCH_TOLERANCE_LEVELS).
    assert level_difference(done["x"].images[0].png, alone.images[0].png) <= (
        BATCH_TOLERANCE_LEVELS
    )


def test_an_exception_inside_the_model_fails_the_job_and_the_next_one_runs(
    runner, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="pipeline.workers.runner"):
        events = run(runner, [("bad-1", small(model="broken"))])
    assert kinds(events) == ["Started", "Failed"]
    failed = events[-1]
    assert failed.message == (
        "generation failed inside the model (IndexError); the job id is in the logs"
    )
    assert not failed.retryable
    assert "bad-1" in caplog.text and "Traceback" in caplog.text  # the details: logs only
    assert isinstance(run(runner, [("next", small())])[-1], Done)


def test_bad_input_fails_with_the_member_facing_message(runner) -> None:
    sha = runner.blobs.put(b"these are not the pixels you are looking for")
    events = run(runner, [("img", small(mode="img2img", image=sha))])
    assert events[-1] == Failed(
        "img", "image is not an image (expected PNG, JPEG, WebP, GIF or BMP)", retryable=False
    )


def test_one_bad_member_does_not_sink_its_batch(runner) -> None:
    bad = small(prompt="a cat <lora::2>", seed=3)  # a LoRA tag without a name
    events = run(runner, [("good", small(seed=2)), ("bad", bad)])
    assert isinstance([e for e in events if e.job_id == "good"][-1], Done)
    failed = [e for e in events if e.job_id == "bad"][-1]
    assert isinstance(failed, Failed) and "needs a name" in failed.message
    assert kinds(events, "good").count("Started") == 1


def test_cancel_before_and_during_the_run(runner) -> None:
    assert kinds(run(runner, [("c", small())], cancelled={"c"})) == ["Cancelled"]
    flags: set[str] = set()
    events: list[Event] = []

    def emit(event: Event) -> None:
        events.append(event)
        if isinstance(event, Progress):
            flags.add("c")  # the member pressed cancel after the first step

    runner.run([("c", slow())], emit, flags.__contains__)
    assert_streamed(events, "c", last="Cancelled")


def test_progress_is_throttled_to_a_few_events_per_second(runner) -> None:
    events = run(runner, [("p", small(width=128, height=128, steps=60))])
    progress = [e for e in events if isinstance(e, Progress)]
    assert 2 <= len(progress) < 30
    assert progress[-1].step == 60


def test_out_of_memory_gets_its_own_message() -> None:
    import torch

    from pipeline.workers.runner import failure_event

    try:
        torch.empty(1 << 50, dtype=torch.uint8)  # a petabyte: the CPU allocator refuses
    except RuntimeError as exc:
        failed = failure_event("m", small(width=512, height=768, count=4), exc, "cpu")
    assert failed == Failed(
        "m", "the worker ran out of memory at 512×768 ×4; try a smaller size or count"
    )
    gpu = failure_event("m", small(), torch.cuda.OutOfMemoryError("CUDA out of memory"), "cuda:0")
    assert gpu.message.startswith("the GPU ran out of memory at 64×64 ×1")


def test_training_yields_at_a_checkpoint_and_keeps_it(runner) -> None:
    from pipeline.contract.jobs import Paused, TrainSpec

    photos = []
    for colour in ((200, 0, 0), (0, 200, 0)):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
        photos.append(runner.blobs.put(buffer.getvalue(), ".png"))
    spec = TrainSpec(name="me", photos=tuple(photos), steps=4, resolution=64, checkpoint_every=2)
    events: list[Event] = []
    runner.run([("train", spec)], events.append, lambda _: False, should_yield=lambda: True)
    assert events[0] == Started("train", worker="test")
    assert events[-1] == Paused("train", step=2)
    assert any(isinstance(e, Progress) and e.loss is not None for e in events)
    checkpoints = Path(runner.config.storage.data_dir) / "checkpoints" / "train"
    assert any(checkpoints.iterdir())  # resumed from here when the job comes back


def test_training_in_bfloat16_runs_to_a_kohya_file(tmp_path) -> None:
    # `[workers] dtype = "bfloat16"` on the CPU: the whole job, validation and samples too.
    from pipeline.contract.jobs import TrainSpec
    from pipeline.workers.runner import Runner

    models = tiny_models(tmp_path / "models")
    config = make_config(models, tmp_path / "data", dtype="bfloat16")
    runner = Runner(config, device="cpu", blobs=BlobStore(config.storage.blobs), name="test")
    photos = []
    for colour in ((200, 0, 0), (0, 200, 0), (0, 0, 200)):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
        photos.append(runner.blobs.put(buffer.getvalue(), ".png"))
    spec = TrainSpec(
        name="me", photos=tuple(photos[:2]), test_photos=(photos[2],), steps=2, resolution=64
    )
    events = run(runner, [("train", spec)])
    done = events[-1]
    assert isinstance(done, Done), events[-1]
    [(name, data)] = done.files
    assert name == "me.safetensors" and data
    assert done.info["base_loss"] is not None and done.info["adapter_loss"] is not None
    assert len(done.images) == 4  # the sample images
    # Scanned like any result (`[safety] detect`, on by default): the policy applies.
    assert all(isinstance(image.nsfw, dict) for image in done.images)
