"""Flux.1 through our engine vs the plain diffusers call, side by side in one run.

Two models: the tiny Flux.1 dev (`pipeline/families/flux_tiny.py`, fp32, 64², one torch
thread, as the tests run) and `--arch`: the real Flux.1 transformer at full width (3072,
24 heads of 128, T5's 4096-wide context, CLIP's 768 pooled) cut to 1 double + 1 single
block, bf16, 512², with one-layer text encoders at the real widths (a real T5-XXL does
not fit this machine; the text encoders run once per image, not per step). Each round
times our `run_generation` and `FluxPipeline.__call__` with the same inputs, alternating;
the figure is the median over rounds of each, and their ratio. Per step: the difference
between a `--steps` call and a 1-step call, divided by `--steps` − 1, so the encoders'
and the VAE's once-per-image cost drops out.

`--storage` holds the transformer as members' cards do: `full` (in `--dtype`), `fp8`
(our `memory = "fp8"`: diffusers' layerwise casting, stored in float8_e4m3fn and computed
in `--dtype`; plain diffusers with the same `enable_layerwise_casting`) and `gguf-q8` (the
transformer written as a GGUF Q8_0 file as city96's Flux files are, in BFL's names for
`--arch`; ours loads it as `source = the .gguf` with `single_file_config` = the folder,
plain diffusers through `from_single_file(..., GGUFQuantizationConfig)`). Per storage:
each side's memory above what the process held before it loaded (GPU: torch's
allocator; CPU: resident set): held once loaded, and the peak of its first call (the load's
own transient, such as fp8's cast from bf16, left out); and the images' difference from
the first storage's in 8-bit levels.

    python bench/bench_flux.py [--rounds 5] [--steps 8] [--arch] [--device cuda] [--size 1024]
        [--storage full fp8 gguf-q8] [--dtype bfloat16|float32]
"""

from __future__ import annotations

import argparse
import gc
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.timing import alternating_medians  # noqa: E402
from pipeline.workers.quiet import quiet_libraries  # noqa: E402


def _arch_model(folder: Path, dtype: torch.dtype = torch.float32):
    """The tiny folder's VAE and tokenizers with a full-width transformer and one-layer
    text encoders at the real widths, saved as a diffusers folder in `dtype`."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tiny = FluxPipeline.from_pretrained(folder)
    # The tiny model's own configs (pipeline/families/flux_tiny.py) at the real widths:
    # only what differs from the tiny layout is named here.
    torch.manual_seed(0)
    # Flux.1's: 24 heads of 128 (RoPE over 16+56+56), T5-XXL's 4096 context, CLIP-L's 768.
    real = dict(attention_head_dim=128, num_attention_heads=24, axes_dims_rope=(16, 56, 56))
    real |= dict(joint_attention_dim=4096, pooled_projection_dim=768, out_channels=None)
    transformer = FluxTransformer2DModel.from_config({**tiny.transformer.config, **real})
    clip_widths = {"hidden_size": 768, "intermediate_size": 64, "num_hidden_layers": 1}
    clip = CLIPTextModel(CLIPTextConfig(**{**tiny.text_encoder.config.to_dict(), **clip_widths}))
    t5_widths = {"d_model": 4096, "d_kv": 16, "d_ff": 64, "num_layers": 1}
    t5 = T5EncoderModel(T5Config(**{**tiny.text_encoder_2.config.to_dict(), **t5_widths}))
    pipe = FluxPipeline(
        scheduler=tiny.scheduler,
        vae=tiny.vae,
        text_encoder=clip,
        tokenizer=tiny.tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tiny.tokenizer_2,
        transformer=transformer,
    )
    out = folder.parent / "arch"
    pipe.to(dtype=dtype).save_pretrained(out)
    return out


STORAGES = ("full", "fp8", "gguf-q8")


def _write_gguf(folder: Path, path: Path, bfl: bool) -> str:
    """The folder's transformer as a GGUF Q8_0 file as city96's are made (tests/gguf_files.py):
    in BFL's layout for the full-width model, checked to come back unchanged through
    diffusers' converter; the tiny model (whose widths that converter cannot split) keeps
    diffusers' names. Returns a line saying what was written and how long it took."""
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
    )
    from safetensors.torch import load_file

    from tests.gguf_files import bfl_flux_state_dict, write_gguf

    start = time.perf_counter()
    state = {}
    for part in sorted((folder / "transformer").glob("*.safetensors")):
        state |= load_file(part)
    if bfl:
        layout = bfl_flux_state_dict(state)
        back = convert_flux_transformer_checkpoint_to_diffusers(dict(layout))
        if set(back) != set(state) or any(not torch.equal(back[k], state[k]) for k in state):
            raise SystemExit("BFL layout does not convert back to the same transformer")
        state = layout
    convert = time.perf_counter() - start
    write_gguf(path, state, "Q8_0")
    took = time.perf_counter() - start
    mb = path.stat().st_size / 2**20
    return (
        f"GGUF Q8_0 ({'BFL' if bfl else 'diffusers'} names, {len(state)} tensors, {mb:.0f} MB) "
        f"written in {took:.1f} s ({convert:.1f} s reading and converting)"
    )


class Peak:
    """Memory above what was held at `start`: torch's allocator on CUDA; on the CPU the
    process's resident set (VmRSS) and its high-water mark (VmHWM, reset through
    /proc/self/clear_refs). `held` is what is resident now, `read` the peak since `start`
    or the last `reset`."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        self.base = self.held(0)
        self.reset()

    def held(self, base: int | None = None) -> int:
        now = torch.cuda.memory_allocated() if self.cuda else _status_bytes("VmRSS")
        return now - (self.base if base is None else base)

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def read(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status_bytes("VmHWM") - self.base


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _loaders(storage: str, folder: Path, gguf: Path, device: str, dtype: torch.dtype):
    """(load ours, load plain diffusers') for one storage. Ours: the worker's ModelCache
    with `[models.flux]` as an admin writes it (memory = "fp8"; source = the .gguf with
    single_file_config = the folder). Plain: FluxPipeline as its docs load it, with the
    same layerwise casting for fp8 and diffusers' GGUFQuantizationConfig for GGUF."""
    from diffusers import FluxPipeline, FluxTransformer2DModel, GGUFQuantizationConfig

    from pipeline.contract.config import config_from_dict
    from pipeline.models.loading import ModelCache

    def ours():
        model = {"source": str(folder), "memory": "fp8" if storage == "fp8" else "full"}
        if storage == "gguf-q8":
            model |= {"source": str(gguf), "single_file_config": str(folder)}
        workers = {"dtype": str(dtype).removeprefix("torch.")}
        config = config_from_dict({"models": {"flux": model}, "workers": workers})
        return ModelCache(config, device).get()

    def plain():
        extra = {}
        if storage == "gguf-q8":
            extra["transformer"] = FluxTransformer2DModel.from_single_file(
                str(gguf),
                quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
                torch_dtype=dtype,
                config=str(folder),
                subfolder="transformer",
            )
        pipe = FluxPipeline.from_pretrained(folder, torch_dtype=dtype, **extra)
        if storage == "fp8":
            pipe.transformer.enable_layerwise_casting(
                storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    return ours, plain


def _calls(model, plain, size: int):
    """(ours, plain): each runs the same job at `steps` and returns its PIL image."""
    from PIL import Image

    from pipeline.contract.jobs import GenerateSpec
    from pipeline.generate.modes import run_generation

    def ours(steps: int):
        job = GenerateSpec(
            prompt="a photo of a cat",
            width=size,
            height=size,
            steps=steps,
            seed=1,
            sampler="Euler",
            cfg_scale=1.0,
        )
        [[image]] = run_generation(model, [job], preview_every=0)
        return Image.open(io.BytesIO(image.png)).convert("RGB")

    def theirs(steps: int):
        with torch.inference_mode():
            return plain(
                "a photo of a cat",
                width=size,
                height=size,
                num_inference_steps=steps,
                guidance_scale=3.5,
                generator=[torch.Generator().manual_seed(1)],
            ).images[0]

    return ours, theirs


def _storage(storage: str, folder: Path, gguf: Path, args, dtype: torch.dtype) -> dict:
    """One storage: each side loaded and its first N-step call measured (peak memory
    above what was held before its load, and the image), then timed rounds alternating
    ours and plain at 1 step and at N steps."""
    load_ours, load_plain = _loaders(storage, folder, gguf, args.device, dtype)
    peak = Peak(args.device)
    row: dict = {"storage": storage}
    sides = {}
    for name, load in (("ours", load_ours), ("diffusers", load_plain)):
        peak.start()
        start = time.perf_counter()
        loaded = load()
        row[f"load_s {name}"] = time.perf_counter() - start
        row[f"held {name}"] = peak.held()
        peak.reset()  # the call's peak, not the load's (fp8 is cast from bf16 as it loads)
        sides[name] = loaded
        if name == "ours":
            ours, _ = _calls(loaded, None, args.size)
            row["image ours"] = ours(args.steps)
        else:
            _, theirs = _calls(None, loaded, args.size)
            row["image diffusers"] = theirs(args.steps)
        row[f"peak {name}"] = peak.read()
    ours, theirs = _calls(sides["ours"], sides["diffusers"], args.size)
    order = [("ours", ours), ("diffusers", theirs)]
    med = alternating_medians(
        order[::-1] if args.diffusers_first else order,
        (1, args.steps),
        args.rounds,
        lambda: _sync(args.device),
    )
    for name in ("ours", "diffusers"):
        row[f"call {name}"] = med[(name, args.steps)]
        row[f"step {name}"] = (med[(name, args.steps)] - med[(name, 1)]) / (args.steps - 1)
    del sides, ours, theirs
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def _levels(a, b) -> tuple[int, float]:
    """(largest, mean) difference in 8-bit levels between two RGB images."""
    import numpy as np

    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    return int(diff.max()), float(diff.mean())


def _table(rows: list[dict], label: str, args) -> None:
    mib = 2**20
    memory = "GPU" if args.device.startswith("cuda") else "RSS"
    print(
        f"| {label} | storage | per step ({args.steps} steps): ours | diffusers | ratio "
        f"| call: ours | diffusers | {memory} held after loading: ours | diffusers "
        f"| peak {memory} in a call: ours | diffusers "
        f"| image vs {rows[0]['storage']}: max / mean levels | ours vs diffusers: max |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    reference = rows[0]["image ours"]
    for row in rows:
        vs_ref = _levels(row["image ours"], reference)
        vs_plain = _levels(row["image ours"], row["image diffusers"])
        name = row["storage"] if row["storage"] != "full" else f"full ({args.dtype})"
        print(
            f"| {args.size}² | {name} | {row['step ours'] * 1000:.1f} ms "
            f"| {row['step diffusers'] * 1000:.1f} ms "
            f"| {row['step ours'] / row['step diffusers']:.3f}× "
            f"| {row['call ours'] * 1000:.0f} ms | {row['call diffusers'] * 1000:.0f} ms "
            f"| {row['held ours'] / mib:.0f} MiB | {row['held diffusers'] / mib:.0f} MiB "
            f"| {row['peak ours'] / mib:.0f} MiB | {row['peak diffusers'] / mib:.0f} MiB "
            f"| {vs_ref[0]} / {vs_ref[1]:.2f} | {vs_plain[0]} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--arch", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=0, help="0: 64 (tiny), 512 (--arch)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: default")
    parser.add_argument(
        "--storage",
        nargs="+",
        choices=STORAGES,
        default=["full"],
        help='how the transformer is held: full (--dtype), fp8 (memory = "fp8": stored '
        "in fp8, computed in --dtype), gguf-q8 (a GGUF Q8_0 file); the first is the "
        "images' reference",
    )
    parser.add_argument(
        "--dtype", default="", help="compute dtype; default bfloat16 (--arch), float32 (tiny)"
    )
    parser.add_argument(
        "--diffusers-first", action="store_true", help="each round times diffusers' call first"
    )
    args = parser.parse_args()
    quiet_libraries()
    from pipeline.families.flux_tiny import write_tiny_flux

    if args.threads or not args.arch:
        torch.set_num_threads(args.threads or 1)
    args.size = args.size or (512 if args.arch else 64)
    args.dtype = args.dtype or ("bfloat16" if args.arch else "float32")
    dtype = getattr(torch, args.dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_flux(Path(tmp) / "dev")
        if args.arch:
            start = time.perf_counter()
            folder = _arch_model(folder, dtype=dtype)
            print(f"**architecture folder written in {time.perf_counter() - start:.1f} s**")
        gguf = Path(tmp) / "flux1-arch-Q8_0.gguf"
        if "gguf-q8" in args.storage:
            print(f"**{_write_gguf(folder, gguf, bfl=args.arch)}**")
        for storage in args.storage:
            rows.append(_storage(storage, folder, gguf, args, dtype))
    label = "Flux.1 architecture, 1+1 blocks" if args.arch else "tiny Flux.1 dev"
    _table(rows, f"{label}, {args.device}", args)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
