"""`sdbot generate` with the prompt language: --from-png re-runs a PNG's parameters (an
A1111 PNG, and one of ours); bad editing syntax is one line, exit 2, nothing written.

The CLI's own `main()` in this process (tests/test_cli.py runs it as a subprocess; each
of those costs ~10 s of imports on the shared CI machine).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image, PngImagePlugin

from bot.cli import main
from pipeline.contract.infotext import parse_infotext, read_infotext
from tests.conftest import BATCH_TOLERANCE_LEVELS, level_difference


@pytest.fixture
def sdbot(tmp_path, tiny_sd, monkeypatch, capsys):
    (tmp_path / "config.toml").write_text(
        f'[models.tiny]\nsource = "{tiny_sd}"\n[storage]\ndata_dir = "data"\n'
    )
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> SimpleNamespace:
        code = main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


# As A1111 1.10 writes it (processing.create_infotext), for a size our tiny model draws.
A1111_PNG_PARAMETERS = (
    "a [red:blue:0.5] square AND a cat:0.5, <lora:mystyle:0.7>\n"
    "Negative prompt: blurry, (bad hands:1.2)\n"
    "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 42, "
    "Size: 64x64, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, "
    'Lora hashes: "mystyle: 0123456789ab", TI hashes: "easynegative: c74b4e810b03", '
    "Version: v1.10.1"
)


def _a1111_png(path):
    # A1111 saves its PNGs with PIL, the parameters in a tEXt chunk named "parameters".
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_PNG_PARAMETERS)
    Image.new("RGB", (64, 64), (90, 90, 90)).save(path, pnginfo=info)


def _diffusers_lora(tiny_sd, folder):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), weight_name="mystyle.safetensors"
    )


def test_from_png_reruns_an_a1111_png_and_says_what_it_does_not(sdbot, tmp_path, tiny_sd):
    _a1111_png(tmp_path / "a1111.png")
    _diffusers_lora(tiny_sd, tmp_path / "loras")
    run = sdbot("generate", "--from-png", "a1111.png", "--lora-dir", "loras", "--out", "again.png")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    info = parse_infotext(read_infotext((tmp_path / "again.png").read_bytes()))
    assert info["Prompt"] == "a [red:blue:0.5] square AND a cat:0.5, <lora:mystyle:0.7>"
    assert info["Negative prompt"] == "blurry, (bad hands:1.2)"
    for key, value in {"Steps": "3", "Sampler": "DPM++ 2M", "Schedule type": "Karras"}.items():
        assert info[key] == value
    assert (info["CFG scale"], info["Seed"], info["Size"]) == ("6.5", "42", "64x64")
    assert info["Lora hashes"].startswith("mystyle: ")
    notes = [line for line in run.stderr.splitlines() if line.startswith("note: ")]
    assert notes[0].startswith("note: the image was made with model v1-5-pruned-emaonly")
    assert notes[1] == "note: not re-run here: Clip skip: 2; TI hashes: easynegative: c74b4e810b03"
    assert notes[2].startswith("note: LoRA mystyle is not the file the image was made with")

    # Our own PNG, re-run: the same settings, so the same image.
    rerun = sdbot("generate", "--from-png", "again.png", "--lora-dir", "loras")
    assert rerun.returncode == 0, rerun.stderr
    assert "note:" not in rerun.stderr
    first, second = (tmp_path / "again.png").read_bytes(), (tmp_path / "out.png").read_bytes()
    assert read_infotext(first) == read_infotext(second)
    assert level_difference(first, second) <= BATCH_TOLERANCE_LEVELS


def test_bad_prompt_syntax_is_one_line_and_writes_nothing(sdbot, tmp_path):
    (tmp_path / "notes.png").write_text("not a png")
    cases = [
        (["a [cat:dog:-1]"], "[cat:dog:-1] in the prompt: the switch point must be a step count"),
        ([" AND ".join(["x"] * 50)], "the prompt has 50 parts joined by AND; the limit is 8"),
        (["a [cat:dog:5 in a field"], "has a '[' that is never closed"),
        (["--from-png", "notes.png"], "notes.png is not a PNG image that can be read"),
        ([], "generate needs a prompt, or --from-png FILE"),
    ]
    for args, message in cases:
        result = sdbot("generate", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out.png").exists()
