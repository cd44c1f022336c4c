"""Prompt editing, alternation and AND in the denoising loop, on the tiny models.

Oracles: prompt editing equals diffusers' own pipeline swapping its prompt embeddings
from `callback_on_step_end` at the step A1111 switches; AND equals a denoising loop
written here from the scheduler API, one UNet call per part, combined as A1111 does
(u + cfg · Σ wᵢ(cᵢ − u)). Images are compared in 8-bit levels.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.contract.config import config_from_dict
from pipeline.contract.jobs import GenerateSpec
from pipeline.generate.modes import run_generation
from pipeline.models.loading import ModelCache
from pipeline.models.schedulers import build_scheduler
from tests.conftest import BATCH_TOLERANCE_LEVELS, level_difference

A = "a photo of a cat"
B = "red green blue yellow"


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return ModelCache(config_from_dict({"models": {"tiny": {"source": str(tiny_sd)}}}), "cpu").get()


@pytest.fixture(scope="module")
def xl(tiny_xl):
    return ModelCache(config_from_dict({"models": {"xl": {"source": str(tiny_xl)}}}), "cpu").get()


def spec(**changes) -> GenerateSpec:
    values = {"prompt": A, "width": 64, "height": 64, "steps": 4, "seed": 7, "sampler": "DDIM"}
    return GenerateSpec(**{**values, **changes})


def image(model, **changes):
    return run_generation(model, [spec(**changes)])[0][0].png


def diffusers_swapping(model, texts_by_step: list[str], negative: str = "", cfg: float = 7.0):
    """diffusers' pipeline with its embeddings replaced after each step by the text the
    next step uses (step k: texts_by_step[k])."""
    pipe = model.pipe
    xl = getattr(pipe, "text_encoder_2", None) is not None
    encoded = {}
    for text in set(texts_by_step):
        out = pipe.encode_prompt(
            text, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative,
        )  # fmt: skip
        encoded[text] = out

    def kwargs_for(text):
        out = encoded[text]
        if xl:
            return {
                "prompt_embeds": out[0],
                "negative_prompt_embeds": out[1],
                "pooled_prompt_embeds": out[2],
                "negative_pooled_prompt_embeds": out[3],
            }
        return {"prompt_embeds": out[0], "negative_prompt_embeds": out[1]}

    def swap(pipe_, step, timestep, tensors):
        if step + 1 >= len(texts_by_step):
            return {}
        nxt = kwargs_for(texts_by_step[step + 1])
        changed = {
            "prompt_embeds": torch.cat([nxt["negative_prompt_embeds"], nxt["prompt_embeds"]])
        }
        if xl:
            changed["add_text_embeds"] = torch.cat(
                [nxt["negative_pooled_prompt_embeds"], nxt["pooled_prompt_embeds"]]
            )
        return changed

    original = pipe.scheduler
    pipe.scheduler = build_scheduler(model.scheduler_config, "DDIM")
    inputs = ["prompt_embeds", "add_text_embeds"] if xl else ["prompt_embeds"]
    try:
        with torch.inference_mode():
            result = pipe(
                **kwargs_for(texts_by_step[0]),
                num_inference_steps=len(texts_by_step),
                guidance_scale=cfg,
                width=64,
                height=64,
                generator=[torch.Generator("cpu").manual_seed(7)],
                callback_on_step_end=swap,
                callback_on_step_end_tensor_inputs=inputs,
            )
    finally:
        pipe.scheduler = original
    return result.images[0]


@pytest.mark.parametrize(
    "prompt, by_step",
    [
        # A1111 counts steps from 0 and keeps the first text up to and including `when`.
        (f"[{B}:{A}:1]", [B, B, A, A]),
        (f"[{B}:{A}:0.5]", [B, B, B, A]),  # a fraction of the 4 steps: 2
        (f"[{B}|{A}]", [B, B, A, B]),
    ],
)
def test_editing_and_alternation_equal_diffusers_swapping_embeddings(sd, prompt, by_step):
    ours = image(sd, prompt=prompt)
    oracle = diffusers_swapping(sd, by_step)
    assert level_difference(ours, oracle) <= BATCH_TOLERANCE_LEVELS
    assert level_difference(ours, image(sd, prompt=A)) > 10


def test_sdxl_editing_swaps_embeddings_and_pooled(xl):
    ours = image(xl, prompt=f"[{B}:{A}:1]", negative_prompt="blurry")
    oracle = diffusers_swapping(xl, [B, B, A, A], negative="blurry")
    assert level_difference(ours, oracle) <= BATCH_TOLERANCE_LEVELS
    assert level_difference(ours, image(xl, prompt=A, negative_prompt="blurry")) > 3


def composable_loop(model, parts: list[tuple[str, float]], negative: str, cfg: float):
    """A denoising loop from the scheduler API: one UNet call per part and one for the
    negative, noise = u + cfg · Σ w (c − u)."""
    from diffusers.utils.torch_utils import randn_tensor

    pipe = model.pipe
    scheduler = build_scheduler(model.scheduler_config, "DDIM")
    scheduler.set_timesteps(4)

    def embed(text):
        return pipe.encode_prompt(text, "cpu", 1, False)[0]

    conds = [(embed(text), weight) for text, weight in parts]
    uncond = embed(negative)
    shape = (1, pipe.unet.config.in_channels, 8, 8)
    latents = randn_tensor(shape, generator=[torch.Generator("cpu").manual_seed(7)])
    latents = latents * scheduler.init_noise_sigma
    with torch.inference_mode():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            u = pipe.unet(x, t, encoder_hidden_states=uncond).sample
            noise = u.clone()
            for c, weight in conds:
                noise += cfg * weight * (pipe.unet(x, t, encoder_hidden_states=c).sample - u)
            latents = scheduler.step(noise, t, latents).prev_sample
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(decoded)[0]


@pytest.mark.parametrize(
    "prompt, parts, cfg",
    [
        (f"{A} AND {B}:0.7", [(A, 1.0), (f" {B}", 0.7)], 7.0),
        (f"{A}:1.5", [(A, 1.5)], 7.0),  # a single part's weight, as A1111
        (f"{A} AND {B}:-0.5", [(A, 1.0), (f" {B}", -0.5)], 1.0),  # no CFG in diffusers
    ],
)
def test_and_equals_composable_diffusion(sd, prompt, parts, cfg):
    ours = image(sd, prompt=prompt, negative_prompt="ugly", cfg_scale=cfg)
    oracle = composable_loop(sd, parts, "ugly", cfg)
    assert level_difference(ours, oracle) <= BATCH_TOLERANCE_LEVELS
    plain = image(sd, prompt=A, negative_prompt="ugly", cfg_scale=cfg)
    assert level_difference(ours, plain) > BATCH_TOLERANCE_LEVELS


def _diffusers_lora(pipe_class, model_dir, path, seed):
    """A LoRA file as diffusers writes it (peft adapter on a fresh UNet, random B)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    unet.add_adapter(
        LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    )
    pipe_class.save_lora_weights(path, unet_lora_layers=get_peft_model_state_dict(unet))
    return path / "pytorch_lora_weights.safetensors"


JOBS = [
    {"prompt": f"[{B}:{A}:1]", "seed": 1},
    {"prompt": A, "seed": 2},
    {"prompt": f"{A} AND {B}:0.5", "negative_prompt": "[ugly:blurry:0.5]", "seed": 3},
    {"prompt": f"[{A}|{B}|dog]", "seed": 4, "count": 2},
]


def test_mixed_batch_each_equals_its_solo_run(sd, xl):
    for model in (sd, xl):
        jobs = [spec(**job) for job in JOBS]
        together = run_generation(model, jobs)
        for job, images in zip(jobs, together):
            alone = run_generation(model, [job])[0]
            for batched, solo in zip(images, alone):
                assert level_difference(batched.png, solo.png) <= BATCH_TOLERANCE_LEVELS


def test_mixed_lora_batch_with_editing_and_and(sd, tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    from pipeline.contract.blobs import BlobStore
    from pipeline.contract.jobs import LoraRef
    from pipeline.loras.adapters import LoraCache

    blobs = BlobStore(tmp_path / "blobs")
    refs = []
    for i in range(2):
        path = _diffusers_lora(StableDiffusionPipeline, tiny_sd, tmp_path / f"l{i}", seed=i)
        refs.append(LoraRef(f"style{i}", blobs.put(path.read_bytes(), ".safetensors"), 1.0))
    cache = LoraCache(sd.pipe, max_bytes=2**30)
    jobs = [
        spec(**JOBS[2], loras=(refs[0],)),
        spec(**JOBS[0], loras=(refs[1],)),
        spec(**JOBS[3]),
    ]
    together = run_generation(sd, jobs, blobs=blobs, loras=cache)
    for job, images in zip(jobs, together):
        alone = run_generation(sd, [job], blobs=blobs, loras=cache)[0]
        for batched, solo in zip(images, alone):
            assert level_difference(batched.png, solo.png) <= BATCH_TOLERANCE_LEVELS
    without = run_generation(sd, [spec(**JOBS[2])])[0][0]
    assert level_difference(together[0][0].png, without.png) > 3  # the LoRA applied


def test_each_distinct_text_is_encoded_once_per_job(sd):
    seen = []
    hook = sd.pipe.text_encoder.register_forward_hook(
        lambda module, args, output: seen.append(args[0].shape[0])
    )
    try:
        run_generation(sd, [spec(prompt="[a|b] c", steps=6, count=2)])
    finally:
        hook.remove()
    assert seen == [3]  # "", "a c", "b c": one encoder call, one row each, for both images


def test_schedules_span_the_evaluations_the_sampler_runs(sd):
    from pipeline.generate.conditioning import denoising_evaluations

    scheduler = build_scheduler(sd.scheduler_config, "Euler a")
    assert denoising_evaluations(scheduler, 20) == 20
    assert denoising_evaluations(scheduler, 20, 0.5) == 10
    heun = build_scheduler(sd.scheduler_config, "Heun")
    assert denoising_evaluations(heun, 10) == 19  # second order: A1111 counts these too
