"""`sdbot` on the command line: real subprocesses, real files, one-line errors."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from pipeline.contract.infotext import parse_infotext, read_infotext

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def sdbot(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**ENV, "PYTHONPATH": str(Path.cwd())},
        timeout=240,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_sd):
    root = tmp_path_factory.mktemp("cli")
    (root / "config.toml").write_text(
        f'[models.tiny]\nsource = "{tiny_sd}"\n[defaults]\nsteps = 3\nwidth = 64\nheight = 64\n'
        '[storage]\ndata_dir = "data"\n'
    )
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(root / "mask.png")
    Image.new("L", (32, 32), 255).save(root / "small-mask.png")
    return root


def test_generate_writes_pngs_with_infotext_and_prints_seeds(workdir):
    result = sdbot(
        "generate",
        "a photo of a cat",
        "--count",
        "2",
        "--seed",
        "5",
        "--out",
        "cat.png",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines == ["cat-1.png  seed 5", "cat-2.png  seed 6"]
    info = parse_infotext(read_infotext((workdir / "cat-2.png").read_bytes()))
    assert info["Seed"] == "6" and info["Steps"] == "3" and info["Model"] == "tiny"
    assert "step 3/3" in result.stderr  # the terminal progress bar


@pytest.mark.parametrize("extra", [["--mask", "mask.png"], ["--outpaint", "right:32"], []])
def test_generate_edits_an_image(workdir, extra):
    result = sdbot(
        "generate", "a red square", "--image", "in.png", *extra, "--out", "e.png", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    size = Image.open(workdir / "e.png").size
    assert size == ((96, 64) if "--outpaint" in extra else (64, 64))


def test_model_can_be_a_path(workdir, tiny_sd):
    result = sdbot("generate", "cat", "--model", str(tiny_sd), "--out", "p.png", cwd=workdir)
    assert result.returncode == 0, result.stderr


def _bomb_png(path: Path) -> None:
    """A valid PNG header claiming 20000×20000 with a tiny body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "steps must be between 1 and 150, but is 0"),
        (["--width", "513"], "width must be a multiple of 8, but is 513"),
        (["--sampler", "Eular a"], "unknown sampler 'Eular a'"),
        (["--model", "/no/such/model"], "unknown model '/no/such/model'"),
        (["--image", "notes.txt"], "is not an image"),
        (["--image", "corrupt.png"], "could not be decoded"),
        (["--image", "bomb.png"], "20000×20000"),
        (
            ["--image", "in.png", "--mask", "small-mask.png"],
            "the mask is 32×32 but the image is 64×64",
        ),
        (["--image", "missing.png"], "does not exist"),
        (["--image", "in.png", "--keep", "face"], "no face found in the photo; attach a mask"),
    ],
)
def test_bad_input_gets_one_line_and_a_nonzero_exit(workdir, args, message):
    (workdir / "notes.txt").write_text("hello")
    (workdir / "corrupt.png").write_bytes((workdir / "in.png").read_bytes()[:60])
    _bomb_png(workdir / "bomb.png")
    result = sdbot("generate", "cat", *args, cwd=workdir)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_tiny_model_command_writes_a_loadable_folder(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bot.cli", "tiny-model", str(tmp_path / "m"), "--xl"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m" / "text_encoder_2").is_dir()
    assert (tmp_path / "m" / "tokenizer" / "vocab.json").exists()


def test_tiny_model_single_file_checkpoint_generates(tmp_path):
    folder = tmp_path / "m"
    made = subprocess.run(
        [sys.executable, "-m", "bot.cli", "tiny-model", str(folder), "--single-file"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    (tmp_path / "config.toml").write_text(
        f'[models.ckpt]\nsource = "{folder / "model.safetensors"}"\n'
        f'single_file_config = "{folder}"\n'
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bot.cli",
            "generate",
            "a cat",
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--out",
            "c.png",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**ENV, "PYTHONPATH": str(Path.cwd())},
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert parse_infotext(read_infotext((tmp_path / "c.png").read_bytes()))["Model"] == "ckpt"


def test_doctor_reports_models_database_and_token_without_showing_it(workdir):
    env = {**ENV, "DISCORD_TOKEN": "secret-token-value", "PYTHONPATH": str(Path.cwd())}
    result = subprocess.run(
        [sys.executable, "-m", "bot.cli", "doctor"],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=env,
        timeout=120,
    )
    assert "[ok  ] model tiny: sd1" in result.stdout
    assert "[ok  ] cpu: a CPU worker uses float32" in result.stdout
    assert "[ok  ] DISCORD_TOKEN: set" in result.stdout
    assert "secret-token-value" not in result.stdout + result.stderr
    assert "database" in result.stdout


def test_generate_resolves_loras_from_the_lora_folder(workdir, tiny_sd):
    from diffusers import StableDiffusionPipeline

    from tests.lycoris_files import write_lora

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    (workdir / "loras").mkdir(exist_ok=True)
    write_lora(workdir / "loras" / "MyStyle.safetensors", pipe, "kohya", seed=3)
    ok = sdbot(
        "generate",
        "a cat <lora:mystyle:0.7>",
        "--lora-dir",
        "loras",
        "--seed",
        "1",
        "--out",
        "styled.png",
        cwd=workdir,
    )
    assert ok.returncode == 0, ok.stderr
    info = parse_infotext(read_infotext((workdir / "styled.png").read_bytes()))
    assert info["Prompt"] == "a cat <lora:mystyle:0.7>"
    assert info["Lora hashes"].startswith("mystyle: ")
    missing = sdbot("generate", "a cat <lora:mystile:0.5>", "--lora-dir", "loras", cwd=workdir)
    assert missing.returncode == 2
    assert "LoRA 'mystile' not found" in missing.stderr and "MyStyle" in missing.stderr
    weight = sdbot("generate", "a cat <lora:mystyle:9>", "--lora-dir", "loras", cwd=workdir)
    assert weight.returncode == 2 and "between -4 and 4" in weight.stderr
