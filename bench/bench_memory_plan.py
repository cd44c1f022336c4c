"""The memory planner's estimated peak beside the measured one, per plan and per phase
(encode, denoise, decode), with the time per denoising step: on the CPU (a CPU worker's
memory is its RSS) or on a GPU (`--device cuda`: torch.cuda.max_memory_allocated), on
SD 1.5's architecture or a flow family's at full width cut to a block or two
(`--write-arch`, as bench_flux.py and bench_families_2026.py build them). Run:

    python bench/arch_model.py sd15 /tmp/sd15-arch
    python bench/bench_memory_plan.py --model /tmp/sd15-arch --sizes 256 512 --steps 1
    python bench/bench_memory_plan.py --model /tmp/sd15-arch --sizes 256 512 --calibrate
    python bench/bench_memory_plan.py --write-arch flux --model /tmp/flux-arch
    python bench/bench_memory_plan.py --model /tmp/flux-arch --sizes 512 --steps 2
    python bench/bench_memory_plan.py --model /tmp/flux-arch --device cuda --ladder --sizes 1024

On the CPU each case runs in a fresh process: the baseline is the RSS after imports (the
model's classes included); the model is loaded through the worker's own path (the plan
for this card, then load_model → apply_plan); the peak is reset after loading
(`/proc/self/clear_refs` 5) so that loading's transient copies do not count, and again at
each phase; measured = the largest phase's peak − baseline. On a GPU every case runs in one
process (`--in-process`: CUDA's peak statistics are exact) and the baseline is what was
allocated before loading. `--ladder` measures every step of the card's ladder (GPU:
full/device … sequential/sequential; CPU: full, fp8). The estimate is the plan's `peak`
for a server whose largest job is exactly the one run (`largest_job`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
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


class Phases:
    """Peak memory of each phase of one generation (encode, denoise, decode) and the time
    of the denoising steps, from hooks on the pipeline's own modules: the denoiser's first
    call ends encoding, the VAE decoder's first call ends denoising. The peak is
    `pipeline.models.memory`'s (CUDA: max_memory_allocated; CPU: peak RSS), reset at
    each boundary; `baseline` is subtracted."""

    def __init__(self, pipe, device: str, baseline: int):
        from pipeline.families import of_pipe

        self.device, self.baseline = device, baseline
        self.peaks: dict[str, int] = {}
        self.marks: dict[str, float] = {}
        denoiser = of_pipe(pipe).denoiser(pipe)
        self._hooks = [
            denoiser.register_forward_pre_hook(lambda *_: self._boundary("encode", "denoise")),
            pipe.vae.decoder.register_forward_pre_hook(
                lambda *_: self._boundary("denoise", "decode")
            ),
        ]
        self._start("encode")

    def _start(self, phase: str) -> None:
        from pipeline.models.memory import reset_peak

        self._sync()
        self.marks[phase] = time.perf_counter()
        reset_peak(self.device)

    def _boundary(self, ending: str, starting: str) -> None:
        if ending in self.peaks or ending not in self.marks:
            return  # the phase is over already (the next step, the next tile)
        from pipeline.models.memory import read_peak

        self._sync()
        self.peaks[ending] = read_peak(self.device) - self.baseline
        self._start(starting)

    def finish(self) -> None:
        self._boundary("decode", "end")
        for hook in self._hooks:
            hook.remove()

    def seconds(self, phase: str) -> float:
        following = {"encode": "denoise", "denoise": "decode", "decode": "end"}[phase]
        return self.marks[following] - self.marks[phase]

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)


def _allocated(device: str) -> int:
    """What the process holds before loading: CUDA's allocated bytes, or the RSS."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.memory_allocated(device)
    return _status("VmRSS")


def _import_classes(model: str) -> None:
    """Import the pipeline's and its components' classes before the baseline is taken:
    diffusers and transformers import a model's module on first use, and that code (0.1–0.2
    GB of RSS) is the process's, not the plan's."""
    import importlib

    index = json.loads((Path(model) / "model_index.json").read_text())
    named = [("diffusers", index["_class_name"])]
    named += [tuple(v) for v in index.values() if isinstance(v, list) and len(v) == 2 and v[0]]
    for library, name in named:
        getattr(importlib.import_module(library), name, None)


def largest_job(config, family: str, size: int, count: int, steps: int):
    """The job the estimate is for: the family's sampler; a prompt the family reads to its
    limit (its text tokens; SD's 77 are not counted); CFG in the same batch where the
    family can run it so (Z-Image Turbo's default 1.0 would not)."""
    from pipeline.contract.families import defaults_for
    from pipeline.contract.jobs import GenerateSpec
    from pipeline.contract.memory_plan import family_memory

    own = defaults_for(config, "arch")  # the family's sampler and CFG (Flux: CFG 1)
    fam = family_memory(family)
    prompt = "a photo of a cat"
    if fam.text_tokens:
        prompt = ", ".join([prompt] * fam.text_tokens)  # cut at the limit, with a notice
    cfg = own.cfg_scale if fam.cfg_batch == 1 or own.cfg_scale > 1 else 4.0
    return GenerateSpec(
        prompt=prompt,
        width=size,
        height=size,
        steps=steps,
        count=count,
        seed=1,
        sampler=own.sampler,
        schedule=own.schedule,
        cfg_scale=cfg,
    )


def measure(model: str, device: str, plan_name: str, size: int, count: int, steps: int,
            tiling: int) -> dict:  # fmt: skip
    """One plan, one generation: load through the worker's path (the plan for this card,
    then load_model → apply_plan) and measure each phase's peak and the time per step.
    `plan_name`: "MODE/TEXT" (a ladder step) or "MODE" (the planner's choice of text
    encoders for that mode)."""
    import gc

    sys.path.insert(0, str(ROOT))
    from pipeline.contract.config import config_from_dict
    from pipeline.contract.families import detect_family
    from pipeline.contract.memory_plan import components_for, jobs_for, plan_memory
    from pipeline.generate.modes import run_generation
    from pipeline.models.loading import choose_dtype, load_model
    from pipeline.models.memory import worker_card
    from pipeline.workers.quiet import quiet_libraries

    quiet_libraries()
    mode, _, text = plan_name.partition("/")
    pixels = size * size
    config = config_from_dict(
        {
            "models": {
                "arch": {
                    "source": model,
                    "family": "auto",  # read from the folder: any family's architecture
                    "memory": mode,
                    "vae_tiling_above": tiling or 4 * pixels,
                }
            },
            "limits": {"max_pixels": pixels, "max_count": count},
            "workers": {"max_batch_pixels": pixels * count, "devices": [device]},
        }
    )
    settings = config.models[0]
    family = detect_family(model)
    components, _ = components_for(settings, family)
    card = worker_card(device, choose_dtype(device, config.workers.dtype))
    plan = plan_memory("arch", family, components, card, jobs_for(config, settings), mode,
                       text or "auto")  # fmt: skip
    settings = dataclasses.replace(settings, vae_tiling_above=plan.vae_tiling_above)
    _import_classes(model)
    gc.collect()
    baseline = _allocated(device)
    loaded = load_model(settings, device=device, dtype=config.workers.dtype, plan=plan)
    gc.collect()
    loaded_bytes = _allocated(device) - baseline
    spec = largest_job(config, family, size, count, steps)
    phases = Phases(loaded.pipe, device, baseline)
    run_generation(loaded, [spec])
    phases.finish()
    result = {
        "plan": f"{plan.mode}/{plan.text_encoders}",
        "estimate": plan.peak,
        "estimate_phases": dict(plan.phases),
        "measured": max(phases.peaks.values()),
        "phases": phases.peaks,
        "step_s": phases.seconds("denoise") / steps,
        "weights_estimate": sum(p.bytes for p in plan.placements),
        "weights_measured": loaded_bytes,
        "reason": plan.reason,
    }
    del loaded, phases
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    return result


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
    if family == "tiny-flux":  # the GPU script's dry run: the same steps, a tiny model
        from pipeline.families.flux_tiny import write_tiny_flux

        write_tiny_flux(folder)
        return
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


def cases(args) -> list[tuple[str, str, int]]:
    """(label, plan: "MODE" or "MODE/TEXT", VAE tiling threshold) to measure."""
    if args.ladder:
        from pipeline.contract.memory_plan import CPU_LADDER, GPU_LADDER

        ladder = GPU_LADDER if args.device.startswith("cuda") else CPU_LADDER
        chosen = [f"{m}/{t}" for m, t in ladder]
        return [(p, p, 0) for p in chosen if not args.plans or p in args.plans]
    return [c for c in CASES if c[0] in (args.plans or [c[0] for c in CASES])]


def run_case(args, plan: str, size: int, tiling: int) -> dict:
    if args.in_process:
        return measure(args.model, args.device, plan, size, args.count, args.steps, tiling)
    out = subprocess.run(
        [sys.executable, __file__, "--model", args.model, "--device", args.device,
         "--count", str(args.count), "--steps", str(args.steps),
         "--child", plan, str(size), str(tiling)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def row(label: str, size: int, r: dict) -> str:
    gb = 1024**3
    phases = " / ".join(
        f"{r['phases'].get(p, 0) / gb:.2f} ({r['estimate_phases'][p] / gb:.2f})"
        for p in ("encode", "denoise", "decode")
    )
    return (
        f"| {label} | {size}² | {r['estimate'] / gb:.2f} GiB | {r['measured'] / gb:.2f} GiB"
        f" | {r['estimate'] / r['measured']:.2f} | {phases} | {r['step_s']:.2f} s |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the GPU figures)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--child", nargs=3, metavar=("PLAN", "SIZE", "TILING"))
    parser.add_argument("--calibrate", action="store_true", help="measure the SD factors")
    parser.add_argument("--plans", nargs="+", default=[], help="labels (or MODE/TEXT steps)")
    parser.add_argument(
        "--ladder",
        action="store_true",
        help="every step of the card's ladder (GPU: full/device … sequential/sequential)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="every case in this process (a GPU's peak is exact; a CPU's RSS is not)",
    )
    archs = ["flux", "zimage", "qwen-image", "flux2-klein", "tiny-flux"]
    parser.add_argument(
        "--write-arch",
        choices=archs,
        help="write that family's full-width, cut-down folder to --model and stop",
    )
    parser.add_argument(
        "--arch", choices=archs, help="as --write-arch when --model has no model, then measure"
    )
    args = parser.parse_args()
    if args.write_arch:
        write_arch(args.write_arch, Path(args.model))
        return
    if args.arch and not (Path(args.model) / "model_index.json").exists():
        write_arch(args.arch, Path(args.model))
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
        plan, size, tiling = args.child[0], int(args.child[1]), int(args.child[2])
        r = measure(args.model, args.device, plan, size, args.count, args.steps, tiling)
        print(json.dumps(r))
        return
    args.in_process = args.in_process or args.device.startswith("cuda")
    index = json.loads((Path(args.model) / "model_index.json").read_text())["_class_name"]
    print(f"{index} at {args.model}, {args.device}, {args.count} image(s), {args.steps} step(s)")
    if args.device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(args.device)
        name = torch.cuda.get_device_properties(args.device).name
        print(f"card: {name}, {total / 1024**3:.1f} GiB, {free / 1024**3:.1f} GiB free")
    print(
        "| plan | size | estimated peak | measured peak | est./meas. "
        "| encode / denoise / decode, GiB measured (est.) | time per step |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        for label, plan, tiling in cases(args):
            try:
                r = run_case(args, plan, size, tiling)
            except Exception as exc:  # noqa: BLE001 - one plan's failure is a row, not the end
                if isinstance(exc, subprocess.CalledProcessError):
                    exc = (exc.stderr or "").strip().splitlines()[-1:] or exc
                print(f"| {label} | {size}² | failed: {str(exc)[:200]} | | | | |", flush=True)
                continue
            print(row(label, size, r), flush=True)


if __name__ == "__main__":
    main()
