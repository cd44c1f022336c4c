"""`[workers] compile = true`: the worker compiles the default size at start, a job at
that size runs the compiled graph and gives the eager images (within a tolerance),
another size runs eager without compiling, and LoRA jobs run in the graph's LoRA slots
(`[loras] slots`) without recompiling it, or eager when their LoRAs do not fit.

One inductor compile in the whole file (the runner fixture's warm-up, ~70 s on a
loaded CPU with a cold cache: the LoRA slots double the graph); the no-recompile test
runs on dynamo's `aot_eager` backend (same capture and guards, seconds to compile).
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


@pytest.fixture(scope="module")
def light(tiny_sd, tmp_path_factory):
    """A compile worker on dynamo's `aot_eager` backend: the same graph capture, guards
    and recompile rules as inductor without its C++ codegen, so warming a second batch
    shape costs seconds. For the no-recompile proof, which is about dynamo's guards."""
    from pipeline.workers.runner import Runner

    config = _config(tiny_sd, tmp_path_factory.mktemp("data"), True)
    runner = Runner(config, device="cpu", blobs=BlobStore(config.storage.blobs), name="l")
    return warm_on_aot_eager(runner)


def warm_on_aot_eager(runner):
    """Warm a compile worker's graphs on dynamo's `aot_eager` backend (see `light`)."""
    from pipeline.generate import compiled

    saved, compiled.BACKEND = compiled.BACKEND, "aot_eager"
    try:
        runner.warm_up()
    finally:
        compiled.BACKEND = saved
    return runner


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


def _lora(runners, tmp_path, kind: str, seed: int) -> LoraRef:
    """A LyCORIS-made file of `kind`, stored in the workers' blob stores."""
    from diffusers import StableDiffusionPipeline

    from tests.lycoris_files import write_lora

    runners = list(runners.values()) if isinstance(runners, dict) else runners
    pipe = StableDiffusionPipeline.from_pretrained(runners[0].config.model("default").source)
    path = write_lora(tmp_path / f"{kind}-{seed}.safetensors", pipe, kind, seed=seed)
    data = path.read_bytes()
    for runner in runners:
        runner.blobs.put(data, ".safetensors")
    return LoraRef(f"{kind}{seed}", hashlib.sha256(data).hexdigest(), 0.8)


def _bank(runner):
    from pipeline.loras.slots import bank_of

    return bank_of(runner._model("default").pipe.unet)


@pytest.mark.parametrize("kind,in_slots", [("locon", True), ("loha", False)])
def test_a_lora_job_runs_compiled_in_slots_or_eager_and_equals_the_eager_worker(
    runners, tmp_path, kind, in_slots
):
    """LoRA/LoCon go in the compiled graph's slots; a LoHa runs the eager path."""
    fast_runner = runners[True]
    ref = _lora(runners, tmp_path, kind, 0)
    runs, calls = _compiled(fast_runner).runs, _bank(fast_runner).stats.calls
    pngs = [_png(runner, _spec(loras=(ref,))) for runner in (runners[False], fast_runner)]
    # The compile worker's weights are channels_last, its kernels inductor's.
    assert level_difference(pngs[0], pngs[1]) <= COMPILED_TOLERANCE_LEVELS
    assert _compiled(fast_runner).runs == runs + in_slots
    assert _bank(fast_runner).stats.calls == calls + in_slots
    assert level_difference(pngs[1], _png(fast_runner, _spec())) > 0  # the LoRA did something


def test_lora_switches_and_a_mixed_batch_of_4_never_recompile(light, tmp_path):
    """After warming batch 1 (the fixture) and batch 4 (here, without LoRAs): a job with
    LoRA A, then B, then four jobs with four different LoRAs in one call all run the
    compiled graphs, under the stance that raises on any recompile."""
    from torch._dynamo.utils import counters

    from pipeline.generate import compiled

    fast_runner = light
    refs = [_lora([light], tmp_path, "lora", seed) for seed in range(3)]
    refs.append(_lora([light], tmp_path, "locon", 1))
    batch = [(f"job{i}", _spec(seed=10 + i)) for i in range(4)]
    with compiled.compiling():
        events = []
        fast_runner.run(batch, events.append, lambda job_id: False)
        assert len([e for e in events if isinstance(e, Done)]) == 4
    graphs, runs = counters["stats"]["unique_graphs"], _compiled(fast_runner).runs
    calls, eager = _bank(fast_runner).stats.calls, _bank(fast_runner).stats.eager
    with compiled.no_recompiling():
        solo = [_png(fast_runner, _spec(seed=10 + i, loras=(refs[i],))) for i in range(2)]
        events = []
        mixed_jobs = [(f"m{i}", _spec(seed=10 + i, loras=(r,))) for i, r in enumerate(refs)]
        fast_runner.run(mixed_jobs, events.append, lambda job_id: False)
    done = {e.job_id: e.images[0].png for e in events if isinstance(e, Done)}
    assert len(done) == 4, events
    assert counters["stats"]["unique_graphs"] == graphs
    assert _compiled(fast_runner).runs == runs + 3  # A, B and the batch: all compiled
    assert _bank(fast_runner).stats.calls == calls + 3
    assert _bank(fast_runner).stats.eager == eager
    # In the batch, A's and B's images are their solo images (within the tolerance of a
    # batch against a solo call) and the LoRAs did differ.
    for i in range(2):
        assert level_difference(done[f"m{i}"], solo[i]) <= COMPILED_TOLERANCE_LEVELS
    assert level_difference(done["m0"], _png(fast_runner, _spec(seed=10))) > 0


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
