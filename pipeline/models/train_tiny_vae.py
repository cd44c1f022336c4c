"""Train the tiny model's VAE on real photos, once, and write its weights.

`sdbot tiny-model` writes random weights for everything else, but a random VAE turns
any photo into noise, so no test could check what img2img, inpaint, outpaint, upscale
or face fix do to a real photo. This script trains the tiny VAE architecture
(`pipeline.families.sd_tiny.tiny_vae`) to reconstruct photos from scikit-image's sample
data (random crops, flips, several scales; with --test-views also the astronaut as the
tests see it), and writes `pipeline/models/data/tiny_vae.safetensors` with the latent
scaling factor (1 / the latents' standard deviation, as SD's 0.18215 was chosen) in its
metadata. The weights are committed, so writing a tiny model stays instant and
deterministic. Options:

    --minutes M     training time (default 25); the learning rate follows a cosine
                    over it, from --lr (default 2e-3) to --min-lr (default 1e-4),
                    after --warmup steps of linear warm-up (default 0)
    --resume PATH   start from these weights (steps are counted on from theirs)
    --test-views    each step also trains on the whole astronaut at 64² and 128² and
                    on a 64² crop of it at 256², on the latent grid (TEST_SIZES)
    --threads N     torch threads (default: torch's own)
    --out PATH      where to write (default: the committed file); written every
                    1000 steps too, so a run stopped early leaves its weights

The committed weights (9,395 steps in all) were made by two runs, the first with
this script as of commit a3d583a (3,661 steps), the second resumed from
its output (5,734 steps, 1 thread; runs are timed, so step counts vary by machine):

    python -m pipeline.models.train_tiny_vae --minutes 25
    python -m pipeline.models.train_tiny_vae --resume pipeline/models/data/tiny_vae.safetensors \
        --minutes 30 --lr 1e-3 --min-lr 2e-5 --warmup 100 --test-views --threads 1

It logs the round trip at 128² as it trains and prints the mean round-trip error, in
levels, on the astronaut and on a held-out photo at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

WEIGHTS = Path(__file__).resolve().parent / "data" / "tiny_vae.safetensors"
# Half of every batch comes from the astronaut, the portrait the mode and face tests
# use, at the sizes they use it (64² to 512², face crops upscaled as face fix does);
# the rest from other photos, so that any photo comes back recognisable.
FOCUS = "astronaut"
TRAIN_PHOTOS = (
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "colorwheel",
    "camera",
    "coins",
    "moon",
    "brick",
    "page",
    "clock",
    "cell",
)
HELD_OUT = ("chelsea",)  # never trained on: how well it does on a photo it has not seen
# The sizes the tests give the whole astronaut at (tests/test_modes_on_photos.py: 128²,
# and 64² upscaled; tests/test_face_jobs.py: 256²): each step also trains on the whole
# photo at 64² and 128² and on a grid-aligned 64² crop of it at 256².
TEST_SIZES = (64, 128, 256)


def photos(names: tuple[str, ...]) -> list[np.ndarray]:
    import skimage.data

    out = []
    for name in names:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        out.append(image[..., :3].astype(np.float32) / 127.5 - 1.0)
    return out


def random_crops(images, rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    from PIL import Image

    batch = []
    for _ in range(count):
        image = images[rng.integers(len(images))]
        h, w = image.shape[:2]
        # From the whole photo down to a crop of half `size` upscaled 2x.
        side = int(rng.uniform(size // 2, min(h, w)))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = image[y : y + side, x : x + side]
        if side != size:
            pil = Image.fromarray(((crop + 1) * 127.5).clip(0, 255).astype(np.uint8))
            crop = np.asarray(pil.resize((size, size), Image.BICUBIC), np.float32) / 127.5 - 1
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        batch.append(crop.transpose(2, 0, 1))
    return np.stack(batch)


def test_views(image: np.ndarray) -> dict[int, np.ndarray]:
    """The photo as the tests see it: the whole of it LANCZOS-resized to each size."""
    return {size: resized(image, size) for size in TEST_SIZES}


def aligned_crop(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A `size` crop of a channels-first image on its 8-pixel latent grid, so the crop's
    latents are the ones the whole image has there."""
    h, w = image.shape[1:]
    y = 8 * rng.integers(0, (h - size) // 8 + 1)
    x = 8 * rng.integers(0, (w - size) // 8 + 1)
    return image[:, y : y + size, x : x + size]


def resized(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    pil = Image.fromarray(((image + 1) * 127.5).clip(0, 255).astype(np.uint8))
    return (
        np.asarray(pil.resize((size, size), Image.LANCZOS), np.float32).transpose(2, 0, 1) / 127.5
        - 1
    )


def main(argv: list[str] | None = None) -> None:
    import torch
    from safetensors.torch import save_file

    from pipeline.families.sd_tiny import tiny_vae

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=25.0, help="the training time")
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="where to write the weights")
    parser.add_argument("--resume", type=Path, help="start from these weights")
    parser.add_argument("--lr", type=float, default=2e-3, help="the peak learning rate")
    parser.add_argument("--min-lr", type=float, default=1e-4, help="the learning rate at the end")
    parser.add_argument("--warmup", type=int, default=0, help="steps of linear warm-up")
    parser.add_argument(
        "--test-views",
        action="store_true",
        help="also train each step on the astronaut as the tests see it (TEST_SIZES)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    vae = tiny_vae(scaling_factor=1.0)
    resumed_steps = 0
    if args.resume:
        from safetensors import safe_open
        from safetensors.torch import load_file

        vae.load_state_dict({k: v.float() for k, v in load_file(str(args.resume)).items()})
        with safe_open(str(args.resume), framework="pt") as f:
            resumed_steps = int(f.metadata().get("steps", 0))
    focus, train, held_out = photos((FOCUS,)), photos(TRAIN_PHOTOS), photos(HELD_OUT)
    views = test_views(focus[0])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    start = time.monotonic()
    budget = args.minutes * 60

    def loss_of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        l1 = (recon - x).abs().mean()
        kl = posterior.kl().mean() / x[0].numel()
        return l1 + 1e-6 * kl + 0.5 * ((recon - x) ** 2).mean(), l1

    def round_trip(image: np.ndarray, size: int) -> float:
        """The mean error in levels of the whole photo's round trip at `size`²."""
        test = torch.from_numpy(resized(image, size)[None].copy())
        with torch.no_grad():
            out = vae.decode(vae.encode(test).latent_dist.mode()).sample.clamp(-1, 1)
        return ((out - test).abs() * 127.5).mean().item()

    def write(step: int) -> tuple[dict[str, float], float]:
        """Write the weights with their scaling factor; return the round-trip errors."""
        with torch.no_grad():
            probe = torch.from_numpy(random_crops(focus + train, rng, 32, 64).copy())
            std = vae.encode(probe).latent_dist.mode().std().item()
        errors = {
            f"{name} {size}²": round_trip(image, size)
            for name, image in ((FOCUS, focus[0]), (HELD_OUT[0], held_out[0]))
            for size in TEST_SIZES
        }
        metadata = {
            "scaling_factor": json.dumps(round(1.0 / std, 5)),
            "steps": str(resumed_steps + step),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # fp16 on disk: half the size, and the tiny model is loaded as fp32 anyway.
        state = {k: v.detach().half().contiguous() for k, v in vae.state_dict().items()}
        save_file(state, str(args.out), metadata=metadata)
        return errors, std

    step, ema = 0, None
    while (elapsed := time.monotonic() - start) < budget:
        # Linear warm-up, then cosine decay over the time budget from the peak to --min-lr.
        lr = args.min_lr + 0.5 * (args.lr - args.min_lr) * (
            1 + math.cos(math.pi * elapsed / budget)
        )
        if step < args.warmup:
            lr *= (step + 1) / args.warmup
        for group in optimizer.param_groups:
            group["lr"] = lr
        small = [random_crops(focus, rng, 4, 64), random_crops(train, rng, 4, 64)]
        if args.test_views:
            small += [views[64][None], aligned_crop(views[256], rng, 64)[None]]
        loss, l1 = loss_of(torch.from_numpy(np.concatenate(small).copy()))
        if args.test_views:
            # The 128² view is a quarter of the pixels of the step: weigh it so.
            whole, _ = loss_of(torch.from_numpy(views[128][None].copy()))
            count = sum(len(b) for b in small)
            loss = (loss * count + whole * 4) / (count + 4)  # 128² is four 64² crops
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        ema = l1.item() if ema is None else 0.98 * ema + 0.02 * l1.item()
        if step % 200 == 0:
            minutes = (time.monotonic() - start) / 60
            print(
                f"step {step} ({minutes:.1f} min): L1 {ema * 127.5:.1f} levels, lr {lr:.1e}; "
                f"round trip at 128²: {FOCUS} {round_trip(focus[0], 128):.1f}, "
                f"{HELD_OUT[0]} {round_trip(held_out[0], 128):.1f}",
                flush=True,
            )
        if step % 1000 == 0:
            write(step)  # so that a run stopped early leaves its weights

    errors, std = write(step)
    print(
        f"{resumed_steps + step} steps; latents std {std:.3f} (scaling factor {1 / std:.5f}); "
        "mean round-trip error in levels: "
        + ", ".join(f"{k} {v:.1f}" for k, v in errors.items())
        + f" ({HELD_OUT[0]} held out); wrote {args.out}"
    )


if __name__ == "__main__":
    main()
