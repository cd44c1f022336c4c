"""What the dispatcher re-checks before a queued job reaches a worker
(`bot.services.admission.still_runnable`): only what can change while a job waits —
the server's limits as an admin left them, and whether its LoRAs still exist."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bot import store
from bot.services.admission import still_runnable
from bot.services.guild_settings import effective
from pipeline.contract.config import config_from_dict
from pipeline.contract.jobs import GenerateSpec, JobError, LoraRef, TrainSpec

SHA = "ab" * 32


@pytest.fixture
def config(tmp_path):
    return config_from_dict(
        {
            "models": {"tiny": {"source": str(tmp_path / "model")}},
            "storage": {"data_dir": str(tmp_path / "data")},
            "limits": {"max_steps": 50},
        }
    )


@pytest.fixture
def db(config):
    return store.open_db(config.storage.database)


def test_a_limit_tightened_while_the_job_waited_fails_it(db, config):
    row = {"guild_id": "7"}
    spec = GenerateSpec(prompt="a cat", steps=30, seed=1)
    still_runnable(db, config, row, spec)  # as queued
    store.set_guild_setting(db, "7", "limits.max_steps", 20)  # /admin settings meanwhile
    with pytest.raises(JobError, match="steps must be between 1 and 20, but is 30"):
        still_runnable(db, config, row, spec)
    still_runnable(db, config, {"guild_id": "8"}, spec)  # another server: its own limits


def test_a_server_limit_is_never_looser_than_config_toml(db, config):
    # Set when config.toml allowed more; config.toml was tightened since.
    store.set_guild_setting(db, "7", "limits.max_steps", 80)
    assert effective(config, store.guild_settings(db, "7")).limits.max_steps == 50
    with pytest.raises(JobError, match="steps must be between 1 and 50, but is 60"):
        still_runnable(db, config, {"guild_id": "7"}, GenerateSpec(prompt="x", steps=60, seed=1))


def test_a_lora_deleted_while_the_job_waited_fails_it(db, config):
    lora = store.add_lora(db, owner_id="5", guild_id="7", name="me", sha256=SHA, size_bytes=1)
    spec = GenerateSpec(prompt="a portrait", seed=1, loras=(LoraRef("me", SHA, 0.8),))
    still_runnable(db, config, {"guild_id": "7"}, spec)
    store.delete_lora(db, lora["id"], by_user="5")
    with pytest.raises(JobError, match="the LoRA me was deleted after this job was queued"):
        still_runnable(db, config, {"guild_id": "7"}, spec)


def test_training_is_checked_against_todays_limits_too(db, config):
    spec = TrainSpec(name="me", photos=(SHA,), captions=("photo",), token="sks", steps=900)
    still_runnable(db, config, {"guild_id": "7"}, spec)
    store.set_guild_setting(db, "7", "limits.max_train_steps", 500)
    with pytest.raises(JobError, match="steps must be between 0 and 500, but is 900"):
        still_runnable(db, config, {"guild_id": "7"}, spec)


async def test_what_the_chosen_models_family_cannot_do_is_refused_before_queueing(tmp_path):
    """The family's own check (the worker makes it too) runs at submission: nothing of
    such a job is queued. Real tiny model folders; the family is read from their files."""
    from bot.services.admission import family_questions
    from pipeline.families.flux_tiny import write_tiny_flux
    from pipeline.families.qwen_image_tiny import write_tiny_qwen_image

    schnell = write_tiny_flux(tmp_path / "schnell", variant="schnell")
    edit = write_tiny_qwen_image(tmp_path / "edit", variant="edit")
    config = config_from_dict(
        {
            "models": {"schnell": {"source": str(schnell)}, "edit": {"source": str(edit)}},
            "storage": {"data_dir": str(tmp_path / "data")},
        }
    )
    fine = GenerateSpec(prompt="a cat", model="schnell", steps=4, sampler="Euler", seed=1)
    await family_questions(config, replace(fine, width=64, height=64))
    with pytest.raises(JobError, match=r"^Flux.1 schnell is distilled for 1–4 steps; 50 "):
        await family_questions(config, replace(fine, width=64, height=64, steps=50))
    with pytest.raises(JobError, match=r"^Flux.1 schnell sizes must be multiples of 16"):
        await family_questions(config, replace(fine, width=72, height=64))
    with pytest.raises(JobError, match=r"^Qwen-Image-Edit models cannot txt2img; modes: "):
        await family_questions(config, replace(fine, model="edit", steps=8, width=64, height=64))


async def test_a_personal_model_the_family_cannot_train_is_refused_before_queueing(tmp_path):
    """Training on Flux.1 dev is queued with its family's defaults; on schnell it is
    refused in one line at submission (the worker checks it again). Real tiny folders."""
    from bot.services.admission import family_questions
    from bot.services.training import train_spec, training_family
    from pipeline.families.flux_tiny import write_tiny_flux

    config = config_from_dict(
        {
            "models": {
                variant: {"source": str(write_tiny_flux(tmp_path / variant, variant=variant))}
                for variant in ("dev", "schnell")
            },
            "storage": {"data_dir": str(tmp_path / "data")},
        }
    )

    def spec(model: str) -> TrainSpec:
        family = training_family(config.model(model))
        return train_spec(
            config,
            name="me",
            photos=["a" * 64],
            captions=[],
            token="sks",
            subject="person",
            model=model,
            method="lora",
            steps=0,
            resolution=512,
            family=family,
        )

    dev = spec("dev")
    assert (dev.rank, dev.alpha, dev.learning_rate) == (16, 16.0, 1e-4)  # Flux.1's defaults
    await family_questions(config, dev)
    with pytest.raises(JobError, match=r"^Flux.1 schnell models cannot train personal models: "):
        await family_questions(config, spec("schnell"))
    with pytest.raises(JobError, match=r"^Flux.1 models train at a multiple of 16 px, not 520$"):
        await family_questions(config, replace(dev, resolution=520))
