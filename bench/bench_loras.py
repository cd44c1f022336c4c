"""LoRA switching and mixed-LoRA batches against the plain diffusers way.

    python bench/bench_loras.py [--steps 4] [--size 64] [--threads 1] [--repeats 3]

On the tiny random-weight model (CPU unless CUDA is present) it prints a markdown table:
applying a cached LoRA vs loading an uncached one, and four jobs with four different
LoRAs run (a) the plain diffusers way, one by one with `load_lora_weights` + generate +
`unload_lora_weights`, (b) one by one through `LoraCache.activate` with the adapters
cached, and (c) as one mixed batch with `activate_per_sample`. Then, per LyCORIS format
(files written by lycoris-lora, see tests/lycoris_files.py): the time to load a file
cold (read, check, map every layer, move to the device) and to apply it once cached, and
the time of one generation with it beside the plain model's.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import timed  # noqa: E402
from pipeline.contract.jobs import LoraRef  # noqa: E402
from pipeline.families.sd_tiny import write_tiny_model  # noqa: E402
from pipeline.loras.adapters import LoraCache  # noqa: E402
from pipeline.prompts.encoding import encode_prompts  # noqa: E402
from tests.lycoris_files import KINDS, write_lora  # noqa: E402

PROMPTS = ["a photo of a cat", "a dog", "a portrait of a woman", "a city at night"]


def load_pipe(path: Path, device: str, dtype: str = "float32"):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=getattr(torch, dtype))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], args: argparse.Namespace) -> None:
    embeds = encode_prompts(pipe, prompts, [""] * len(prompts))
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    pipe(
        **embeds,
        num_inference_steps=args.steps,
        height=args.size,
        width=args.size,
        guidance_scale=5.0,
        generator=generators,
        output_type="np",
    )
    sync()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def refs(paths: list[Path]) -> list[tuple[LoraRef, Path]]:
    return [(LoraRef(p.stem, hashlib.sha256(p.read_bytes()).hexdigest(), 0.8), p) for p in paths]


def bench_apply(pipe, loras: list[tuple[LoraRef, Path]], repeats: int) -> tuple[float, float]:
    """Seconds to enter+leave `activate` for a cached LoRA, and for one that must load."""
    cached = LoraCache(pipe, max_bytes=1 << 30)

    def apply_cached() -> None:
        with cached.activate([loras[0]]):
            pass

    hot = timed(apply_cached, repeats)
    # A cache that holds one file: alternating two LoRAs loads one every time.
    one_slot = LoraCache(pipe, max_bytes=loras[1][1].stat().st_size)
    turn = iter(range(10**9))

    def apply_uncached() -> None:
        with one_slot.activate([loras[1 + next(turn) % 2]]):
            pass

    cold = timed(apply_uncached, repeats)
    return hot, cold


def bench_jobs(pipe, paths: list[Path], args: argparse.Namespace) -> dict[str, float]:
    """Seconds for four jobs with four different LoRAs, three ways."""
    loras = refs(paths)

    def plain_diffusers() -> None:
        for i, path in enumerate(paths):
            pipe.load_lora_weights(str(path), adapter_name=f"job{i}")
            pipe.set_adapters([f"job{i}"], [0.8])
            generate(pipe, [PROMPTS[i]], args)
            pipe.unload_lora_weights()

    cache = LoraCache(pipe, max_bytes=1 << 30)

    def cached_one_by_one() -> None:
        for i, lora in enumerate(loras):
            with cache.activate([lora]):
                generate(pipe, [PROMPTS[i]], args)

    def mixed_batch() -> None:
        with cache.activate_per_sample([[lora] for lora in loras], cfg=True):
            generate(pipe, PROMPTS, args)

    return {
        "plain diffusers: load + generate + unload, one job at a time": timed(
            plain_diffusers, args.repeats
        ),
        "sdbot LoraCache.activate, one job at a time (cached)": timed(
            cached_one_by_one, args.repeats
        ),
        "sdbot activate_per_sample, one batch of 4 (cached)": timed(mixed_batch, args.repeats),
    }


def bench_formats(pipe, folder: Path, args: argparse.Namespace) -> list[tuple[str, ...]]:
    """Per format: cold load, cached apply, and one generation with it."""
    rows = []
    plain = timed(lambda: generate(pipe, PROMPTS[:1], args), args.repeats)
    rows.append(("(no LoRA)", "", "", f"{plain:.3f} s"))
    for kind in KINDS:
        [lora] = refs([write_lora(folder / f"{kind}.safetensors", pipe, kind, seed=5)])

        def cold(lora=lora) -> None:
            with LoraCache(pipe, max_bytes=1 << 30).activate([lora]):
                pass

        warm = LoraCache(pipe, max_bytes=1 << 30)

        def cached(lora=lora, cache=warm) -> None:
            with cache.activate([lora]):
                pass

        def with_lora(lora=lora, cache=warm) -> None:
            with cache.activate([lora]):
                generate(pipe, PROMPTS[:1], args)

        seconds = timed(with_lora, args.repeats)
        rows.append(
            (
                kind,
                f"{timed(cold, args.repeats) * 1e3:.1f} ms",
                f"{timed(cached, args.repeats) * 1e3:.2f} ms",
                f"{seconds:.3f} s ({seconds / plain:.2f}×)",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-formats", dest="formats", action="store_false")
    parser.add_argument("--model", type=Path, help="SD 1.x diffusers folder (default: tiny)")
    parser.add_argument("--device", default="", help="default: cuda when there is one, else cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or write_tiny_model(Path(tmp) / "sd1")
        pipe = load_pipe(model, device, args.dtype)
        paths = [
            write_lora(Path(tmp) / f"lora{i}.safetensors", pipe, "kohya", seed=i) for i in range(4)
        ]
        hot, cold = bench_apply(load_pipe(model, device, args.dtype), refs(paths), args.repeats)
        jobs = bench_jobs(pipe, paths, args)
        formats = (
            bench_formats(load_pipe(model, device, args.dtype), Path(tmp), args)
            if args.formats
            else []
        )
    cpu = f"CPU, {args.threads} thread(s)"
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else cpu
    size = f"{args.size}×{args.size}"
    name = f"SD 1.x model {args.model}" if args.model else "Tiny SD 1.x model"
    print(f"{name}, {size}, {args.steps} steps, CFG on, {args.dtype}, {device_name}\n")
    print("| what | time | images/s | vs plain diffusers |\n|---|---|---|---|")
    print(f"| apply a cached LoRA | {hot * 1e3:.2f} ms | | |")
    print(f"| load an uncached LoRA | {cold * 1e3:.2f} ms | | |")
    plain = next(iter(jobs.values()))
    for name, seconds in jobs.items():
        print(f"| {name} | {seconds:.3f} s | {4 / seconds:.1f} | {plain / seconds:.2f}× |")
    if formats:
        print("\n| format | load cold | apply cached | one image with it |\n|---|---|---|---|")
        for row in formats:
            print("| " + " | ".join(row) + " |")
    print("\nReproduce: python bench/bench_loras.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
