"""`sdbot train`: photos in, a registered kohya LoRA out, and no photos or checkpoints left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image
from safetensors import safe_open
from skimage import data as photos

from bot import store


def run_cli(args: list[str], *, cwd: Path, env: dict[str, str], timeout: int):
    """`python -m bot.cli <args>` as an admin runs it, its output captured as text (also
    used by test_bot_process)."""
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _save_photos(folder: Path, names: tuple[str, ...]) -> list[str]:
    """skimage's sample photos saved as `<name>.jpg` in folder; their file names."""
    for name in names:
        Image.fromarray(getattr(photos, name)()).save(folder / f"{name}.jpg")
    return [f"{name}.jpg" for name in names]


def test_train_command_prepares_trains_registers_and_reports(tmp_path, tiny_sd):
    names = _save_photos(tmp_path, ("astronaut", "coffee", "chelsea", "rocket"))
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / "config.toml").write_text(
        f'[models.tiny]\nsource = "{tiny_sd}"\n[storage]\ndata_dir = "data"\n'
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())}
    result = run_cli(
        ["train", "me", *names, "notes.txt", "--steps", "2", "--resolution", "64"]
        + ["--user", "u1", "--method", "lora"],
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "Accepted 4 photo(s) (1 with a face found)." in result.stdout
    assert "notes.txt" in result.stdout  # the report names the rejected file
    assert "Held-out loss: base" in result.stdout
    assert "<lora:me:0.8>" in result.stdout
    db = store.open_db(tmp_path / "data" / "sdbot.sqlite")
    record = store.find_lora(db, "me", user_id="u1", guild_id=None)
    assert record["method"] == "lora" and record["size_bytes"] > 0
    assert record["metrics"]["steps"] == 2
    with safe_open(record["path"], framework="pt") as f:
        assert any(k.startswith("lora_unet_") for k in f.keys())  # noqa: SIM118 - not iterable
        assert f.metadata()["sdbot_token"] == record["token"]
    assert not (tmp_path / "data" / "training").exists() or not any(
        (tmp_path / "data" / "training").iterdir()
    )
    again = run_cli(
        ["train", "me", *names, "--steps", "2", "--user", "u1"], cwd=tmp_path, env=env, timeout=120
    )
    assert again.returncode == 2
    assert "you already have a LoRA named 'me'" in again.stderr
    bad = run_cli(["train", "other", *names, "--model", "nope"], cwd=tmp_path, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr == "error: unknown model 'nope'; configured models: tiny\n"


def test_train_and_generate_take_a_model_path_without_a_config(tmp_path, tiny_sd):
    # The case that failed: no config.toml, the model given by its folder.
    names = _save_photos(tmp_path, ("astronaut", "coffee", "chelsea"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())}
    model = ["--model", str(tiny_sd)]
    trained = run_cli(
        ["train", "me", *names, *model, "--steps", "1", "--resolution", "64", "--user", "u1"],
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr
    assert "trained lora 'me'" in trained.stdout
    record = store.find_lora(
        store.open_db(tmp_path / "data" / "sdbot.sqlite"), "me", user_id="u1", guild_id=None
    )
    assert record["base_model"] == tiny_sd.name
    generated = run_cli(
        ["generate", "a cat", *model, "--steps", "2"]
        + ["--width", "64", "--height", "64", "--out", "cat.png"],
        cwd=tmp_path,
        env=env,
        timeout=240,
    )
    assert generated.returncode == 0, generated.stderr
    assert Image.open(tmp_path / "cat.png").size == (64, 64)
