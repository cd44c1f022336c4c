"""`[workers] compile = true`: the worker compiles the default size at start, a job at
that size runs the compiled graph and gives the eager images (within a tolerance), and
another size or a job with LoRAs runs eager without compiling.

One compile in the whole file (the runner fixture's warm-up, ~20 s on a loaded CPU).
"""

from __future__ import annotations

import hashlib

import pytest

from pipeline.contract.blobs import BlobStore
from pipeline.contract.config import ConfigError, config_from_dict
from pipeline.contract.jobs import Done, GenerateSpec, LoraRef
from tests.conftest import level_difference

# Compiled kernels (inductor's fused ops, fused QKV) round differently from eager ones.
COMPILED_TOLERANCE_LEVELS = 3


def _config(model, data_dir, compile_on: bool):
    return config_from_dict(
        {
            "models": {"default": {"source": str(model)}},
            "storage": {"data_dir": str(data_dir)},
            "workers": {"backend": "local", "devices": ["cpu"], "compile": compile_on},
            "defaults": {"width": 64, "height": 64, "sampler": "Euler a"},
        }
    )


def _spec(**fields) -> GenerateSpec:
    values = {"width": 64, "height": 64, "steps": 2, "seed": 3, "sampler": "Euler a", **fields}
    return GenerateSpec(prompt="a photo of a cat", **values)


def _png(runner, spec: GenerateSpec) -> bytes:
    events = []
    runner.run([("job", spec)], events.append, lambda job_id: False)
    done = [e for e in events if isinstance(e, Done)]
    assert done, events
    return done[0].images[0].png


@pytest.fixture(scope="module")
def runners(tiny_sd, tmp_path_factory):
    from pipeline.workers.runner import Runner

    made = {}
    for compile_on in (False, True):
        config = _config(tiny_sd, tmp_path_factory.mktemp("data"), compile_on)
        runner = Runner(config, device="cpu", blobs=BlobStore(config.storage.blobs), name="t")
        runner.warm_up()
        made[compile_on] = runner
    return made


def _compiled(runner):
    return runner._model("default")._compiled


def test_compile_key_is_parsed_and_checked(tiny_sd, tmp_path):
    assert _config(tiny_sd, tmp_path, True).workers.compile is True
    assert config_from_dict({"models": {"default": {"source": "x"}}}).workers.compile is False
    with pytest.raises(ConfigError, match="compile must be true or false"):
        config_from_dict({"models": {"default": {"source": "x"}}, "workers": {"compile": "yes"}})


def test_warmed_size_runs_compiled_and_matches_eager(runners):
    compiled = _compiled(runners[True])
    assert compiled.warmed == {(64, 64, 1)} and compiled.compile_s > 0
    runs = compiled.runs
    eager = _png(runners[False], _spec())
    fast = _png(runners[True], _spec())
    assert compiled.runs == runs + 1
    assert level_difference(eager, fast) <= COMPILED_TOLERANCE_LEVELS
    assert fast == _png(runners[True], _spec())  # the same call twice: bit-exact


def test_unwarmed_size_and_batch_run_eager_without_compiling(runners):
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    for spec in (_spec(width=96), _spec(count=2)):
        eager = _png(runners[False], spec)
        fast = _png(runners[True], spec)
        assert level_difference(eager, fast) <= COMPILED_TOLERANCE_LEVELS
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_job_with_a_lora_runs_eager_and_equals_the_eager_worker(runners, tmp_path):
    from diffusers import StableDiffusionPipeline

    from tests.lycoris_files import write_lora

    fast_runner = runners[True]
    pipe = StableDiffusionPipeline.from_pretrained(fast_runner.config.model("default").source)
    path = write_lora(tmp_path / "style.safetensors", pipe, "lora", seed=0)
    data = path.read_bytes()
    ref = LoraRef("style", hashlib.sha256(data).hexdigest(), 1.0)
    runs = _compiled(fast_runner).runs
    pngs = []
    for runner in (runners[False], fast_runner):
        assert runner.blobs.put(data, ".safetensors") == ref.sha256
        pngs.append(_png(runner, _spec(loras=(ref,))))
    # Eager on both; the compile worker's weights are channels_last (other conv kernels).
    assert level_difference(pngs[0], pngs[1]) <= COMPILED_TOLERANCE_LEVELS
    assert _compiled(fast_runner).runs == runs
    assert level_difference(pngs[1], _png(fast_runner, _spec())) > 0  # the LoRA did something


def test_any_lora_mechanism_on_the_unet_means_eager():
    """peft adapters (main), a patched `forward` (the per-layer LoRA patching), a hook."""
    from torch import nn

    from pipeline.generate.compiled import carries_loras

    def fresh():
        return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    assert not carries_loras(fresh())
    patched = fresh()
    patched[1].forward = lambda x: x
    assert carries_loras(patched)
    hooked = fresh()
    hooked[0].register_forward_hook(lambda module, args, output: output)
    assert carries_loras(hooked)
