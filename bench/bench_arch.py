"""The real SD 1.5 / SDXL architectures (random weights) through our code vs plain diffusers.

Each case runs twice, once as plain diffusers and once through sdbot's own path
(`run_generation`, `LoraCache`, `train_lora`), each in a fresh process so its peak RSS
is its own (`ru_maxrss`: the loaded model included; the "load" row shows the model's
share). Both sides load the model through `pipeline.models.loading` (same weights,
dtype, device); only the call differs. On CUDA one 1-step warm-up call runs first and
peak GPU memory is `torch.cuda.max_memory_allocated` over the timed call.

Cases: txt2img (CFG 7, `--steps`), the same with a rank-16 kohya LoRA (loading the
LoRA is part of the call on both sides: a worker's first job with it), img2img and
inpaint (both `--steps` denoising steps), and 2 LoRA training steps (plain: the
diffusers example's loop from bench/bench_train.py, SD 1.x only).

    python bench/bench_arch.py --arch sd15                      # CPU, fp32, 512², 2 steps
    python bench/bench_arch.py --arch sdxl --size 512 --dtype bfloat16
    python bench/bench_arch.py --arch sd15 --device cuda --dtype float16 bfloat16 --in-process
    python bench/bench_arch.py --arch tiny --in-process         # as the GPU script's dry run

The architecture is written once to --model-dir (default /tmp/sdbot-arch-ARCH) by
bench/arch_model.py; `--arch tiny` / `tiny-xl` use the tests' tiny models instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("txt2img", "lora", "img2img", "inpaint", "train")
SIDES = ("plain diffusers", "sdbot")
PROMPT, NEGATIVE = "a photo of a lighthouse at dusk, high quality", "blurry"


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- one case, one side, in this (child) process ------------------------------------------


def load(args: argparse.Namespace):
    import torch

    from pipeline.contract.config import config_from_dict
    from pipeline.models.loading import ModelCache, prepare_device
    from pipeline.workers.quiet import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = prepare_device(args.device)
    config = config_from_dict(
        {"models": {"bench": {"source": args.model_dir}}, "workers": {"dtype": args.dtype}}
    )
    start = time.perf_counter()
    model = ModelCache(config, device).get()
    return model, {"load_s": time.perf_counter() - start, "rss_loaded_mb": _rss_mb()}


def measure(args: argparse.Namespace, model, case: str, side: str) -> dict:
    """Time one case on one side (after a 1-step warm-up on CUDA)."""
    import torch

    if case == "train" and side == "plain diffusers" and model.family != "sd1":
        return {"skipped": True}  # the diffusers example's loop is SD 1.x only
    one = argparse.Namespace(**{**vars(args), "case": case, "side": side})
    one.work = str(Path(args.work) / f"{case}-{side.split()[0]}")
    Path(one.work).mkdir(parents=True, exist_ok=True)
    device = str(model.device)
    cuda = device.startswith("cuda")
    call = _case(one, model)
    if cuda:
        call(warmup=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    call(warmup=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if case == "lora" and side == "plain diffusers":
        model.pipe.unload_lora_weights()  # in-process runs go on with the plain model
    return {
        "seconds": seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": device,
        "card": torch.cuda.get_device_name(device) if cuda else None,
    }


def _case(args: argparse.Namespace, model):
    import torch
    from PIL import Image

    from pipeline.contract.blobs import BlobStore
    from pipeline.contract.infotext import png_bytes
    from pipeline.contract.jobs import GenerateSpec, LoraRef
    from pipeline.generate.modes import run_generation
    from pipeline.loras.adapters import LoraCache

    size, steps, plain = args.size, args.steps, args.side == "plain diffusers"
    pipe = model.pipe
    blobs = BlobStore(Path(args.work) / "blobs")
    photo = _photo(size)
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    image_sha, mask_sha = blobs.put(png_bytes(photo, "")), blobs.put(png_bytes(mask, ""))
    lora_path = Path(args.lora)
    lora_sha = blobs.put(lora_path.read_bytes(), ".safetensors")
    common = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "width": size, "height": size}
    common.update(seed=1, cfg_scale=7.0, sampler="Euler", schedule="Automatic")

    def generator():
        return torch.Generator("cpu").manual_seed(1)

    def kwargs(warmup: bool) -> dict:
        return {
            "negative_prompt": NEGATIVE,
            "guidance_scale": 7.0,
            "generator": generator(),
            "num_inference_steps": 1 if warmup else steps,
        }

    if args.case == "txt2img":
        if plain:
            return lambda warmup: pipe(PROMPT, width=size, height=size, **kwargs(warmup))
        spec = GenerateSpec(**common, steps=steps)
        return lambda warmup: run_generation(model, [_short(spec, warmup)])
    if args.case == "lora":
        # The warm-up runs without the LoRA: the timed call loads it, as a worker's first
        # job with a new LoRA does, then generates with it at weight 0.8.
        if plain:

            def plain_lora(warmup: bool) -> None:
                if not warmup:
                    pipe.load_lora_weights(str(lora_path), adapter_name="bench")
                    pipe.set_adapters(["bench"], [0.8])
                pipe(PROMPT, width=size, height=size, **kwargs(warmup))

            return plain_lora
        loras = LoraCache(pipe, max_bytes=2**34)
        spec = GenerateSpec(**common, steps=steps, loras=(LoraRef("bench", lora_sha, 0.8),))
        return lambda warmup: run_generation(
            model, [_short(spec, warmup, loras=not warmup)], blobs=blobs, loras=loras
        )
    if args.case == "img2img":
        # strength 0.5 of 2 × steps: `steps` denoising steps on both sides.
        if plain:
            img2img = model.img2img()

            def plain_img2img(warmup: bool) -> None:
                options = {**kwargs(warmup), "num_inference_steps": 2 if warmup else 2 * steps}
                img2img(PROMPT, image=photo, strength=0.5, **options)

            return plain_img2img
        spec = GenerateSpec(
            **common, mode="img2img", image=image_sha, strength=0.5, steps=2 * steps
        )
        return lambda warmup: run_generation(model, [_short(spec, warmup, steps=2)], blobs=blobs)
    if args.case == "inpaint":
        if plain:
            inpaint = model.inpaint()
            return lambda warmup: inpaint(
                PROMPT,
                image=photo,
                mask_image=mask,
                strength=1.0,
                width=size,
                height=size,
                **kwargs(warmup),
            )
        spec = GenerateSpec(
            **common,
            mode="inpaint",
            image=image_sha,
            mask=mask_sha,
            strength=1.0,
            only_masked=False,
            mask_blur=4,
            steps=steps,
        )
        return lambda warmup: run_generation(model, [_short(spec, warmup)], blobs=blobs)
    if args.case == "train":
        return _train_case(args, model, plain)
    raise SystemExit(f"unknown case {args.case}")


def _short(spec, warmup: bool, *, steps: int = 1, loras: bool = True):
    """The warm-up variant of a spec: one denoising step (and no LoRA if asked)."""
    from dataclasses import replace

    if not warmup:
        return spec
    return replace(spec, steps=steps, loras=spec.loras if loras else ())


def _photo(size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize(
        (size, size), Image.BICUBIC
    )


def _train_case(args: argparse.Namespace, model, plain: bool):
    from dataclasses import replace

    from pipeline.contract.jobs import Limits, TrainSpec
    from pipeline.training.loop import TrainOptions, TrainPhotos, train_lora

    photos = [_photo(args.size)] * 2
    spec = TrainSpec(
        name="bench",
        photos=("x",) * len(photos),
        steps=2,
        rank=16,
        alpha=8.0,
        resolution=args.size,
        checkpoint_every=10**6,
    )
    if plain:
        from bench.bench_train import diffusers_example

        return lambda warmup: diffusers_example(
            model.pipe, replace(spec, steps=1 if warmup else 2), photos
        )
    runs = iter(range(10))

    def ours(warmup: bool) -> None:
        train_lora(
            model.pipe,
            replace(spec, steps=1 if warmup else 2),
            TrainPhotos(photos),
            TrainOptions(
                checkpoint_dir=Path(args.work) / f"ck{next(runs)}",
                limits=Limits(),
                sample_prompts=["x"],
                sample_steps=1,
                sample_size=min(args.size, 256),
            ),
        )

    return ours


# -- the parent: every case and side, tables ---------------------------------------------


def ensure_model(args: argparse.Namespace) -> str:
    if args.arch in ("tiny", "tiny-xl"):
        from pipeline.families.sd_tiny import write_tiny_model

        directory = Path(args.model_dir or Path(tempfile.gettempdir()) / f"sdbot-{args.arch}")
        if not (directory / "model_index.json").exists():
            write_tiny_model(directory, xl=args.arch == "tiny-xl")
        return str(directory)
    directory = Path(args.model_dir or Path(tempfile.gettempdir()) / f"sdbot-arch-{args.arch}")
    if not (directory / "model_index.json").exists():
        from bench.arch_model import write_arch_model

        print(f"writing the {args.arch} architecture to {directory} (once)", flush=True)
        device = "cuda" if args.device.startswith("cuda") else "cpu"
        write_arch_model(args.arch, directory, device=device, dtype=args.save_dtype)
    return str(directory)


def ensure_lora(model_dir: str, work: Path) -> str:
    path = work / "rank16.safetensors"
    if not path.exists():
        import torch
        from diffusers import DiffusionPipeline

        from tests.lycoris_files import make_lora

        # Half precision for making it: the LyCORIS library works on copies of the
        # UNet and text encoders, and two fp32 SDXL UNets are 20 GB. The file is fp32.
        pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float16)
        make_lora(path, pipe, "lora", rank=16, std=0.01)  # kohya LoRA, made by LyCORIS
        del pipe
    return str(path)


def run_all(args: argparse.Namespace) -> dict:
    args.model_dir = ensure_model(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-arch-"))
    work.mkdir(parents=True, exist_ok=True)
    lora = args.lora = ensure_lora(args.model_dir, work)
    args.work = str(work)
    results: dict[str, dict[str, dict | None]] = {}
    if args.in_process:
        # One process, the model loaded once: peak GPU memory is per call (reset before
        # each), peak RSS is the process's so far. Plain training goes last: it leaves
        # its adapter in the model.
        model, loaded = load(args)
        order = [(c, s) for c in args.cases for s in SIDES]
        order.sort(key=lambda cs: cs == ("train", "plain diffusers"))
        for case, side in order:
            try:
                result = {**measure(args, model, case, side), **loaded}
            except Exception as exc:  # noqa: BLE001 - a failed case is a row, not the end
                result = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            results.setdefault(case, {})[side] = result
            print(f"{case:8} {side:16} {_brief(result)}", flush=True)
        return _report(args, results)
    for case in args.cases:
        results[case] = {}
        for side in SIDES:
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                case,
                side,
                "--model-dir",
                args.model_dir,
                "--lora",
                lora,
                "--work",
                str(work / f"{case}-{side.split()[0]}"),
                "--device",
                args.device,
                "--dtype",
                args.dtype,
                "--size",
                str(args.size),
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
            ]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode != 0 or not line:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                results[case][side] = {"error": " | ".join(tail)}
            else:
                results[case][side] = json.loads(line[-1][len("RESULT ") :])
            print(f"{case:8} {side:16} {_brief(results[case][side])}", flush=True)
    return _report(args, results)


def _report(args: argparse.Namespace, results: dict) -> dict:
    return {
        "arch": args.arch,
        "size": args.size,
        "steps": args.steps,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "in_process": args.in_process,
        "command": "python bench/bench_arch.py " + " ".join(args.argv),
        "results": results,
    }


def _brief(result: dict | None) -> str:
    if result is None:
        return "n/a"
    if "error" in result:
        return "ERROR " + result["error"]
    if result.get("skipped"):
        return "n/a"
    return f"{result['seconds']:.2f} s, peak RSS {result['peak_rss_mb']:.0f} MB"


def markdown(report: dict) -> str:
    results = report["results"]
    first = next(
        (r for sides in results.values() for r in sides.values() if r and "seconds" in r), {}
    )
    where = first.get("card") or f"CPU, {report['threads'] or 'default'} thread(s)"
    rss = " (process so far)" if report.get("in_process") else ""
    lines = [
        f"**{report['arch']}**, {report['size']}², {report['steps']} steps, "
        f"{first.get('dtype', report['dtype'])} on {where}; `{report['command']}`",
        "",
        f"| case | plain diffusers | sdbot | ratio | peak RSS{rss} plain / sdbot | "
        "peak GPU plain / sdbot |",
        "|---|---|---|---|---|---|",
    ]
    for case, sides in results.items():
        plain, ours = sides.get("plain diffusers"), sides.get("sdbot")

        def cell(r, key, fmt):
            if not r or "error" in r or r.get("skipped") or r.get(key) is None:
                return "error" if r and "error" in r else "-"
            return fmt.format(r[key])

        ratio = "-"
        if plain and ours and "seconds" in plain and "seconds" in ours:
            ratio = f"{ours['seconds'] / plain['seconds']:.2f}"
        lines.append(
            f"| {case} | {cell(plain, 'seconds', '{:.2f} s')} | {cell(ours, 'seconds', '{:.2f} s')}"
            f" | {ratio} | {cell(plain, 'peak_rss_mb', '{:.0f}')} / "
            f"{cell(ours, 'peak_rss_mb', '{:.0f}')} MB | {cell(plain, 'peak_gpu_mb', '{:.0f}')} / "
            f"{cell(ours, 'peak_gpu_mb', '{:.0f}')} MB |"
        )
    if first:
        lines.append(
            f"\nmodel loaded in {first['load_s']:.1f} s, RSS after loading "
            f"{first['rss_loaded_mb']:.0f} MB"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["sd15", "sdxl", "tiny", "tiny-xl"], default="sd15")
    parser.add_argument("--size", type=int, default=0, help="default 512 (SDXL 1024, tiny 64)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", nargs="+", default=["auto"], help="one run per dtype")
    parser.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: default)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--model-dir", default="")
    parser.add_argument(
        "--save-dtype", default="float32", help="dtype of a newly written architecture's files"
    )
    parser.add_argument("--work", default="", help="scratch folder (default: a temp folder)")
    parser.add_argument("--out", default="", help="write bench_arch-ARCH.md/.json here")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="every case in this process, the model loaded once (fast; RSS not per case)",
    )
    parser.add_argument("--child", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    parser.add_argument("--lora", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    if not args.size:
        args.size = {"sd15": 512, "sdxl": 1024, "tiny": 64, "tiny-xl": 64}[args.arch]
    if args.child:
        args.case, args.side = args.child
        args.dtype = args.dtype[0]
        model, loaded = load(args)
        result = {**measure(args, model, args.case, args.side), **loaded}
        print("RESULT " + json.dumps(result), flush=True)
        return
    reports = []
    for dtype in args.dtype:
        reports.append(run_all(argparse.Namespace(**{**vars(args), "dtype": dtype})))
    text = "\n".join(markdown(report) for report in reports)
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = f"bench_arch-{args.arch}-{args.device.replace(':', '')}"
        (out / f"{name}.md").write_text(text)
        (out / f"{name}.json").write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
