"""Model families: each the one place that knows its family (pipeline/families/ and the
contract's torch-free half), recognised from its files, refusing what it lacks by name.

The rule that keeps them so is checked statically here: no module outside the family
modules compares a family's name or reaches into a pipeline for a family's components
(`.unet`, `.text_encoder_2`) — the rest of the engine asks the family.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from pipeline.contract import families as contract
from pipeline.contract.jobs import MODES, JobError

REPO = Path(__file__).resolve().parent.parent
FAMILY_MODULES = ("pipeline/families", "pipeline/contract/families")
# A family's name compared or looked up, or a family's component reached by name.
FAMILY_NAMES = {"sd1", "sd2", "sdxl", *contract.FAMILIES}
COMPONENTS = {"unet", "text_encoder_2", "tokenizer_2"}


def _offences(path: Path, root: Path = REPO) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    where = path.relative_to(root)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COMPONENTS:
            found.append(f"{where}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in FAMILY_NAMES | COMPONENTS - {"unet"}:
            found.append(f"{where}:{node.lineno} {node.value!r}")
    return found


def test_only_the_family_modules_know_the_families() -> None:
    paths = [
        p
        for folder in ("pipeline", "bot")
        for p in sorted((REPO / folder).rglob("*.py"))
        if not str(p.relative_to(REPO)).startswith(FAMILY_MODULES)
    ]
    assert len(paths) > 100  # the packages really were found
    offences = [o for p in paths for o in _offences(p)]
    assert not offences, "ask pipeline.families instead:\n" + "\n".join(offences)


def test_the_check_sees_what_it_forbids(tmp_path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('if family == "sdxl":\n    x = pipe.unet\ngetattr(p, "text_encoder_2")\n')
    assert [o.split(" ", 1)[1] for o in _offences(sample, tmp_path)] == [
        "'sdxl'",
        ".unet",
        "'text_encoder_2'",
    ]


# --- the torch-free half ----------------------------------------------------------------


def test_model_folders_and_checkpoints_are_recognised(tiny_sd, tiny_xl) -> None:
    assert contract.detect_family(str(tiny_sd)) == "sd1"
    assert contract.detect_family(str(tiny_xl)) == "sdxl"
    index = json.loads((tiny_xl / "model_index.json").read_text())
    assert contract.family_from_index(index) == "sdxl"
    assert contract.family_from_keys(["conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    assert contract.family_from_keys(["model.diffusion_model.input_blocks.0.0.weight"]) == "sd1"


def test_family_of_a_configured_model(tiny_xl) -> None:
    from pipeline.contract.config import ModelConfig

    assert contract.family_of_model(ModelConfig("m", str(tiny_xl))).train_resolution == 1024
    missing = ModelConfig("m", "/no/such/model.safetensors")
    assert contract.family_of_model(missing) is contract.DEFAULT  # the worker says why


def test_sizes_and_defaults_per_family() -> None:
    sd1, sdxl = contract.spec("sd1"), contract.spec("sdxl")
    assert (sd1.label, sd1.default_size, sd1.size_multiple) == ("SD 1.x", 512, 8)
    assert (sdxl.label, sdxl.default_size, sdxl.train_resolution) == ("SDXL", 1024, 1024)
    assert set(sd1.modes) == set(MODES) == set(sdxl.modes)
    assert contract.label("sd2") == "SD 2.x"


def test_a_mode_option_or_sampler_a_family_lacks_is_refused_naming_it() -> None:
    class EditOnly(contract.FamilySpec):  # what an editing family will declare
        name, label = "edit-only", "Edit-only"
        modes = frozenset({"img2img"})
        options = frozenset({"negative_prompt"})
        samplers = ("Euler",)

    with pytest.raises(JobError, match=r"^Edit-only models cannot txt2img; modes: img2img$"):
        EditOnly.check_mode("txt2img")
    with pytest.raises(JobError, match=r"^Edit-only models have no control option$"):
        EditOnly.check_option("control")
    with pytest.raises(JobError, match=r"^Edit-only models cannot use the sampler 'DDIM'"):
        EditOnly.check_sampler("DDIM")
    contract.spec("sdxl").check_mode("outpaint")  # SD 1.x and SDXL have every mode


def test_config_names_the_families() -> None:
    from pipeline.contract.config import ConfigError, config_from_dict

    # Flux.1 is a family since issue 23; SD3 is none.
    with pytest.raises(
        ConfigError,
        match=r"family must be auto, flux, flux2-klein, qwen-image, "
        r"qwen-image-edit, qwen-image-edit-plus, sd1, sdxl, zimage or zimage-omni",
    ):
        config_from_dict({"models": {"m": {"source": "x", "family": "sd3"}}})


def _shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 - safe_open is no dict


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "full"])
def test_a_lora_files_family_is_read_from_its_keys_and_shapes(tiny_sd, tiny_xl, tmp_path, kind):
    """LyCORIS-made files, with and without text-encoder layers: the UNet's
    cross-attention width alone tells SD 1.x from SDXL."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from tests.lycoris_files import make_lora

    pipes = {
        "sd1": StableDiffusionPipeline.from_pretrained(tiny_sd),
        "sdxl": StableDiffusionXLPipeline.from_pretrained(tiny_xl),
    }
    for family, pipe in pipes.items():
        shapes = _shapes(make_lora(tmp_path / f"{family}.safetensors", pipe, kind).path)
        unet_only = {k: s for k, s in shapes.items() if k.startswith("lora_unet_")}
        assert contract.lora_family(shapes) == family
        assert contract.lora_family(unet_only) == family
    assert contract.lora_family({"lora_unet_x.lora_down.weight": [4, 320]}) is None


# --- the worker half ----------------------------------------------------------------------


def test_each_pipeline_is_known_by_its_family(tiny_sd, tiny_xl) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from pipeline.families import family, of_pipe

    sd = StableDiffusionPipeline.from_pretrained(tiny_sd)
    xl = StableDiffusionXLPipeline.from_pretrained(tiny_xl)
    assert (of_pipe(sd).name, of_pipe(xl).name) == ("sd1", "sdxl")
    assert of_pipe(sd).denoiser(sd) is sd.unet and of_pipe(xl).denoiser(xl) is xl.unet
    assert [e for _, e in of_pipe(xl).text_encoders(xl)] == [xl.text_encoder, xl.text_encoder_2]
    assert family("sdxl").pipeline_class("img2img").__name__ == "StableDiffusionXLImg2ImgPipeline"
    with pytest.raises(JobError, match=r"^SD 1.x models have no edit mode; they have: txt2img, "):
        family("sd1").pipeline_class("edit")
