"""The memory planner's estimated peak beside the measured one, per plan, on a real
architecture on the CPU (a CPU worker's memory is its RSS): SD 1.5's, or a flow family's
at full width cut to a block or two (`--write-arch`, as bench_flux.py and
bench_families_2026.py build them). Run:

    python bench/arch_model.py sd15 /tmp/sd15-arch
    python bench/bench_memory_plan.py --model /tmp/sd15-arch --sizes 256 512 --steps 1
    python bench/bench_memory_plan.py --model /tmp/sd15-arch --sizes 256 512 --calibrate
    python bench/bench_memory_plan.py --write-arch flux --model /tmp/flux-arch
    python bench/bench_memory_plan.py --model /tmp/flux-arch --sizes 512 --steps 2

Each case runs in a fresh process: the RSS after imports is the baseline; the model is
loaded through the worker's own path (ModelCache: plan, then apply_plan); the peak RSS is
reset (`/proc/self/clear_refs` 5) so that loading's transient copies do not count; one
generation runs; measured = peak RSS − baseline. The estimate is the plan's `peak` for a
server whose largest job is exactly this one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (label, memory setting, VAE tiling threshold in pixels: 0 = never for these sizes).
# diffusers' SD VAE tile is 512² (its sample_size): only larger images decode in tiles.
CASES = (("full", "full", 0), ("fp8", "fp8", 0), ("tiled", "full", 128 * 128))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(model: str, memory: str, size: int, count: int, steps: int, tiling: int) -> dict:
    import gc

    sys.path.insert(0, str(ROOT))
    from pipeline.contract.config import config_from_dict
    from pipeline.contract.families import defaults_for
    from pipeline.contract.jobs import GenerateSpec
    from pipeline.contract.memory_plan import plan_for, ram_card
    from pipeline.generate.modes import run_generation
    from pipeline.models.loading import ModelCache
    from pipeline.workers.quiet import quiet_libraries

    quiet_libraries()
    pixels = size * size
    config = config_from_dict(
        {
            "models": {
                "arch": {
                    "source": model,
                    "family": "auto",  # read from the folder: any family's architecture
                    "memory": memory,
                    "vae_tiling_above": tiling or 4 * pixels,
                }
            },
            "limits": {"max_pixels": pixels, "max_count": count},
            "workers": {"max_batch_pixels": pixels * count, "devices": ["cpu"]},
        }
    )
    plan = plan_for(config, config.models[0], ram_card())
    baseline = _status("VmRSS")
    loaded = ModelCache(config, "cpu").get()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    loaded_rss = _status("VmRSS")
    own = defaults_for(config, "arch")  # the family's sampler and CFG (Flux: CFG 1)
    spec = GenerateSpec(
        prompt="a photo of a cat",
        width=size,
        height=size,
        steps=steps,
        count=count,
        seed=1,
        sampler=own.sampler,
        schedule=own.schedule,
        cfg_scale=own.cfg_scale,
    )
    run_generation(loaded, [spec])
    weights = sum(p.bytes for p in plan.placements)
    return {
        "estimate": plan.peak,
        "measured": _status("VmHWM") - baseline,
        "weights_estimate": weights,
        "weights_measured": loaded_rss - baseline,
        "reason": plan.reason,
    }


def calibrate(model: str, size: int) -> dict:
    """The activation factors the planner uses for SD (FamilyMemory.act_factor and
    vae_factor): peak RSS over the weights during one UNet call (batch 2: CFG) and one
    VAE decode, in units of tokens × width × 4 bytes (float32)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(model) / "unet").eval()
    vae = AutoencoderKL.from_pretrained(Path(model) / "vae").eval()
    latents = torch.randn(2, 4, size // 8, size // 8)
    text = torch.randn(2, 77, 768)
    with torch.inference_mode():
        unet(latents[:, :, :8, :8], 1, text)  # touch every weight page first
        vae.decode(latents[:1, :, :8, :8])
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
        unet(latents, 1, text)
        unet_act = _status("VmHWM") - before
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
        vae.decode(latents[:1])
        vae_act = _status("VmHWM") - before
    tokens = 2 * (size // 8) ** 2
    return {
        "unet_factor": unet_act / (tokens * 320 * 4),
        "vae_factor": vae_act / (size * size * 128 * 4),
        "unet_act": unet_act,
        "vae_act": vae_act,
    }


def write_arch(family: str, folder: Path) -> None:
    """The family's transformer at full width, cut down, with text encoders at the real
    hidden width (the speed benchmarks' models), saved as a diffusers folder."""
    import shutil
    import tempfile

    sys.path.insert(0, str(ROOT / "bench"))
    with tempfile.TemporaryDirectory() as tmp:
        if family == "flux":
            from bench_flux import _arch_model

            from pipeline.families.flux_tiny import write_tiny_flux

            built = _arch_model(write_tiny_flux(Path(tmp) / "dev"))
        else:
            from bench_families_2026 import _arch_folder, _cases

            labels = {"zimage": "Z-Image", "qwen-image": "Qwen-Image", "flux2-klein": "Flux.2"}
            _, cases = _cases(Path(tmp))
            label, tiny, _, _ = next(c for c in cases if c[0].startswith(labels[family]))
            built = _arch_folder(label, tiny, 1)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(built, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--child", nargs=3, metavar=("MEMORY", "SIZE", "TILING"))
    parser.add_argument("--calibrate", action="store_true", help="measure the SD factors")
    parser.add_argument("--plans", nargs="+", default=[c[0] for c in CASES], help="labels")
    parser.add_argument(
        "--write-arch",
        choices=["flux", "zimage", "qwen-image", "flux2-klein"],
        help="write that family's full-width, cut-down folder to --model and stop",
    )
    args = parser.parse_args()
    if args.write_arch:
        write_arch(args.write_arch, Path(args.model))
        return
    if args.calibrate:
        print("| size | UNet act. (batch 2) | factor | VAE decode act. | factor |")
        print("| --- | --- | --- | --- | --- |")
        for size in args.sizes:
            r = calibrate(args.model, size)
            print(
                f"| {size}² | {r['unet_act'] / 2**20:.0f} MiB | {r['unet_factor']:.1f} | "
                f"{r['vae_act'] / 2**20:.0f} MiB | {r['vae_factor']:.1f} |",
                flush=True,
            )
        return
    if args.child:
        memory, size, tiling = args.child[0], int(args.child[1]), int(args.child[2])
        print(json.dumps(child(args.model, memory, size, args.count, args.steps, tiling)))
        return
    index = json.loads((Path(args.model) / "model_index.json").read_text())["_class_name"]
    print(f"{index} at {args.model}, CPU, float32, {args.count} image(s), {args.steps} step(s)")
    print("| plan | size | estimated peak | measured peak | est./meas. | weights est. / meas. |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        for label, memory, tiling in (c for c in CASES if c[0] in args.plans):
            out = subprocess.run(
                [sys.executable, __file__, "--model", args.model, "--count", str(args.count),
                 "--steps", str(args.steps), "--child", memory, str(size), str(tiling)],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            r = json.loads(out.strip().splitlines()[-1])
            gb = 1024**3
            print(
                f"| {label} | {size}² | {r['estimate'] / gb:.2f} GiB | {r['measured'] / gb:.2f} GiB"
                f" | {r['estimate'] / r['measured']:.2f} | {r['weights_estimate'] / gb:.2f} / "
                f"{r['weights_measured'] / gb:.2f} GiB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
