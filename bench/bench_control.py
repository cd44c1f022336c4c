"""Per-step cost of ControlNet units and IP-Adapter vs none, through run_generation.

Same process, same model, identical jobs but for the units; the four variants run
alternately. Per-step cost is (time of a LONG-step job − time of a SHORT-step job) /
(LONG − SHORT), which leaves out what is paid once per job (prompt encoding, control
preprocessing, the image encoder, VAE decode). Prints a markdown table.

    python bench/bench_control.py                       # tiny model, 64²
    python bench/arch_model.py sd15 /tmp/sd15-arch
    python bench/bench_control.py --model /tmp/sd15-arch --size 256 --runs 2
    python bench/bench_control.py --preprocessors       # and each preprocessor's time
    python bench/bench_control.py --and-prompt          # and `a AND b` with and without a unit

With --model, the ControlNet is built at that model's size (`ControlNetModel.from_unet`:
the published SD 1.5 ControlNet architecture, random weights) and the IP-Adapter at the
real SD 1.5 IP-Adapter's shapes (4 image tokens from a 1024-d CLIP embedding); its
image encoder stays tiny, since it runs once per job, not per step.

--preprocessors adds a table of each preprocessor's time on the 512² astronaut (processor
resolution 512, on --device). depth, openpose and seg_ofade20k run tiny random-weight
transformers models there (no real weights are available offline): their figure is the
work around the model (resizing, drawing, painting) plus a tiny net, and checks that
they run on the device, not what a real model costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.workers.quiet import quiet_libraries


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=None, help="diffusers folder (default: tiny)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--short", type=int, default=2)
    parser.add_argument("--long", type=int, default=6)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--preprocessors", action="store_true", help="also time preprocessors")
    parser.add_argument("--and-prompt", action="store_true", help="also `a AND b` prompts")
    args = parser.parse_args()
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    from PIL import Image
    from skimage import data

    from bench.timing import sd_job
    from pipeline.contract.blobs import BlobStore
    from pipeline.contract.config import config_from_dict
    from pipeline.contract.control import ControlUnit, Reference
    from pipeline.contract.jobs import GenerateSpec
    from pipeline.control.apply import ControlCache
    from pipeline.families.sd_tiny import write_tiny_model
    from pipeline.families.sd_tiny_control import write_tiny_controlnet, write_tiny_ip_adapter
    from pipeline.generate.modes import run_generation
    from pipeline.models.loading import ModelCache

    work = Path(tempfile.mkdtemp())
    source = args.model or write_tiny_model(work / "tiny")
    write_tiny_controlnet(source, work / "controlnet")
    write_tiny_ip_adapter(source, work / "ip_adapter", projection_dim=1024 if args.model else 32)
    config = config_from_dict(
        {
            "models": {"bench": {"source": str(source), "family": "sd1"}},
            "controlnets": {
                "canny": {"source": str(work / "controlnet"), "preprocessor": "canny"},
                "lines": {"source": str(work / "controlnet"), "preprocessor": "lineart_standard"},
            },
            "ip_adapters": {"ref": {"source": str(work / "ip_adapter")}},
        }
    )
    model = ModelCache(config, args.device).get()
    cache = ControlCache(config)
    blobs = BlobStore(work / "blobs")
    import io

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="PNG")
    photo = blobs.put(buffer.getvalue(), ".png")
    variants = {
        "none": {},
        "1 ControlNet": {"control": (ControlUnit("canny", photo),)},
        "2 ControlNets": {"control": (ControlUnit("canny", photo), ControlUnit("lines", photo))},
        "IP-Adapter": {"reference": Reference("ref", (photo,))},
    }
    if args.and_prompt:
        # AND: 3 UNet rows per step; with a unit the ControlNet runs on each row's text.
        both = {"prompt": "a photo of an astronaut AND a red planet, high quality"}
        variants["none, a AND b"] = both
        variants["1 ControlNet, a AND b"] = {**both, "control": variants["1 ControlNet"]["control"]}

    def job(steps: int, extra: dict) -> GenerateSpec:
        extra = dict(extra)
        prompt = extra.pop("prompt", "a photo of an astronaut, high quality")
        return sd_job(prompt, steps, args.size, **extra)

    def timed(spec: GenerateSpec) -> float:
        start = time.perf_counter()
        run_generation(model, [spec], blobs=blobs, control=cache, preview_every=0)
        seconds = time.perf_counter() - start
        print(f"  {spec.steps} steps: {seconds:.2f} s", file=sys.stderr, flush=True)
        return seconds

    for extra in variants.values():  # warm-up: loads, first-call allocations
        timed(job(args.short, extra))
    per_step: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name, extra in variants.items():
            short, long = timed(job(args.short, extra)), timed(job(args.long, extra))
            per_step[name].append((long - short) / (args.long - args.short))
    base = statistics.median(per_step["none"])
    label = args.model.name if args.model else "tiny"
    print(
        f"\n{label}, {args.size}², CFG 7 (batch 2 per step), {args.device}, "
        f"{torch.get_num_threads()} threads, median of {args.runs}\n"
    )
    print("| variant | ms / step | × none |")
    print("|---|---:|---:|")
    for name, values in per_step.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1000:.1f} | {median / base:.2f} |")
    if args.preprocessors:
        preprocessor_table(work, args.device, max(args.runs, 3))


def preprocessor_table(work: Path, device: str, runs: int) -> None:
    from PIL import Image
    from skimage import data

    from pipeline.control.preprocessors import run_preprocessor
    from pipeline.families import sd_tiny_control as tiny_control

    models = {
        "depth_model": str(tiny_control.write_tiny_depth(work / "depth")),
        "pose_model": str(tiny_control.write_tiny_pose(work / "pose")),
        "segmentation_model": str(tiny_control.write_tiny_segmentation(work / "seg")),
    }
    detector = str(tiny_control.write_tiny_person_detector(work / "detector"))
    photo = Image.fromarray(data.astronaut())
    cases = {
        "canny": {"threshold_a": 100, "threshold_b": 200},
        "lineart_standard": {},
        "scribble_xdog": {"threshold_a": 32},
        "depth (tiny DPT)": {"name": "depth"},
        "openpose (tiny ViTPose, whole image)": {"name": "openpose"},
        "openpose (tiny ViTPose + tiny RT-DETR)": {"name": "openpose", "pose_detector": detector},
        "seg_ofade20k (tiny SegFormer)": {"name": "seg_ofade20k"},
    }
    print(f"\npreprocessors, 512² photo, processor res 512, {device}, median of {runs}\n")
    print("| preprocessor | ms |")
    print("|---|---:|")
    for label, extra in cases.items():
        extra = dict(extra)
        name = extra.pop("name", label)

        def once(name: str = name, extra: dict = extra) -> float:
            start = time.perf_counter()
            run_preprocessor(name, photo, res=512, device=device, **models, **extra)
            return time.perf_counter() - start

        once()  # loads the model
        print(f"| {label} | {statistics.median(once() for _ in range(runs)) * 1000:.1f} |")


if __name__ == "__main__":
    main()
