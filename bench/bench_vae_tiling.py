"""VAE decode time, whole vs tiled (diffusers `enable_tiling`, what `vae_tiling_above`
switches on), alternating in one process. Run:

    python bench/arch_model.py sd15 /tmp/sd15-arch
    python bench/bench_vae_tiling.py --model /tmp/sd15-arch --size 512 --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pipeline.workers.quiet import quiet_libraries


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.model / "vae")
    latents = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator())
    times: dict[str, list[float]] = {"whole": [], "tiled": []}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name in times:
                vae.enable_tiling() if name == "tiled" else vae.disable_tiling()
                start = time.perf_counter()
                vae.decode(latents)
                times[name].append(time.perf_counter() - start)
    print(f"VAE decode {args.size}², {torch.get_num_threads()} threads")
    print("| decode | s |\n| --- | --- |")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} |")


if __name__ == "__main__":
    main()
