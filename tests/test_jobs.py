"""Job specs: JSON round-trip, validation messages, and no torch in the bot's imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.contract.jobs import (
    Cancelled,
    Done,
    Failed,
    GenerateSpec,
    JobError,
    Limits,
    LoraRef,
    OutputImage,
    Paused,
    Progress,
    Started,
    TrainSpec,
    event_from_json,
    event_to_json,
    spec_from_json,
    spec_to_json,
)

LIMITS = Limits()


def test_specs_round_trip_through_json():
    specs = [
        GenerateSpec("a cat", loras=(LoraRef("me", "a" * 64, 0.8),), seed=5, count=2),
        GenerateSpec("x", mode="outpaint", image="b" * 64, outpaint_direction="left"),
        GenerateSpec("make it red", mode="edit", image="b" * 64, images=("e" * 64, "f" * 64)),
        TrainSpec("me", photos=("c" * 64,), test_photos=("d" * 64,), captions=("photo",)),
    ]
    for spec in specs:
        assert spec_from_json(spec_to_json(spec)) == spec


def test_events_round_trip_through_json_with_bytes():
    events = [
        Started("j1", worker="w0"),
        Progress("j1", 3, 20, preview=b"\xff\xd8jpeg", loss=0.25),
        Done(
            "j1",
            images=(OutputImage(b"\x89PNG", 7, "info"),),
            files=(("a.bin", b"\0"),),
            info={"losses": [1.0, 2.0]},
        ),
        Failed("j1", "bad", retryable=True),
        Cancelled("j1"),
        Paused("j1", step=50),
    ]
    for event in events:
        assert event_from_json(event_to_json(event)) == event


def test_unknown_kind_and_fields_are_refused():
    with pytest.raises(JobError, match="unknown job kind"):
        spec_from_json('{"kind": "nope"}')
    with pytest.raises(JobError, match="unknown generate fields: colour"):
        spec_from_json('{"kind": "generate", "prompt": "x", "colour": 1}')


def test_with_seed_fixes_a_seed_and_count_gets_consecutive_seeds():
    spec = GenerateSpec("x", count=3).with_seed()
    assert spec.seed is not None
    assert spec.seeds() == [spec.seed, spec.seed + 1, spec.seed + 2]
    assert GenerateSpec("x").with_seed(42).seed == 42


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 0}, "steps must be between 1 and 150, but is 0"),
        ({"steps": 151}, "steps must be between 1 and 150"),
        ({"width": 513}, "width must be a multiple of 8, but is 513"),
        ({"height": 32}, "height must be between 64 and 2048"),
        ({"width": 2048, "height": 2048}, "the limit is 2.36 MP"),
        ({"cfg_scale": 31.0}, "CFG scale must be between 0 and 30"),
        ({"count": 5}, "count must be between 1 and 4"),
        ({"strength": 1.5}, "strength must be between 0 and 1"),
        ({"prompt": "x" * 4001}, "the prompt is 4001 characters; the limit is 4000"),
        ({"mode": "img2img"}, "img2img needs an input image"),
        ({"mode": "inpaint", "image": "a" * 64}, "inpaint needs a mask"),
        (
            {"mode": "outpaint", "image": "a" * 64, "outpaint_direction": "sideways"},
            "outpaint direction must be one of",
        ),
        (
            {
                "mode": "outpaint",
                "image": "a" * 64,
                "outpaint_direction": "up",
                "outpaint_pixels": 12,
            },
            "outpaint pixels must be a multiple of 8",
        ),
        ({"loras": (LoraRef("me", "a" * 64, 5.0),)}, "LoRA 'me' has weight 5"),
        ({"seed": -1}, "seed must be between 0 and"),
        ({"keep": "hands", "mode": "inpaint", "image": "a" * 64}, "keep must be one of"),
    ],
)
def test_check_names_the_bad_value_and_the_limit(changes, message):
    spec = GenerateSpec(**{"prompt": "a cat", **changes})
    with pytest.raises(JobError) as error:
        spec.check(LIMITS)
    assert message in str(error.value)


def test_batch_key_groups_only_compatible_txt2img_jobs():
    a = GenerateSpec("a cat", seed=1)
    b = GenerateSpec("a dog", seed=2, loras=(LoraRef("me", "a" * 64),))
    assert a.batch_key() == b.batch_key() != ""
    assert GenerateSpec("a", steps=21).batch_key() != a.batch_key()
    assert GenerateSpec("a", mode="img2img", image="a" * 64).batch_key() == ""


def test_importing_jobs_pool_and_config_leaves_torch_unimported():
    code = (
        "import sys, pipeline.contract.jobs, pipeline.contract.config;"
        "import pipeline.contract.samplers, pipeline.contract.infotext;"
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
