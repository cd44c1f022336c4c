"""What one press of /edit's Compare costs the bot process (bot/cogs/edit.py `_compare_png`:
decode the stored photo and result PNGs, draw `pipeline.contract.compare.compare_picture`,
encode the PNG that is sent), for real photos at the sizes members attach.

    python bench/bench_compare.py [--repeats 7]

The photo is scikit-image's astronaut resized to each size; the "result" is the same
photo recoloured (an edit's output at the photo's size, as the worker returns it). It
runs in a thread of the bot (`asyncio.to_thread`), so the event loop never waits on it;
the figures are what it takes of a core: CPU time of this process (median of
`--repeats` after one warm-up) and wall time in brackets, with the load average.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image, ImageOps  # noqa: E402
from skimage import data  # noqa: E402

from bench.timing import timed  # noqa: E402
from bot.cogs.edit import _compare_png  # noqa: E402

SIZES = ((512, 512), (1024, 1024), (2048, 1536))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=4)  # as the bot stores photos
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    astronaut = Image.fromarray(data.astronaut())
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    print("| photo and result | Compare picture | PNG sent | CPU time | (wall) |")
    print("|---|---|---|---|---|")
    for width, height in SIZES:
        photo = astronaut.resize((width, height), Image.Resampling.LANCZOS)
        before, after = png(photo), png(ImageOps.posterize(photo, 4))
        result = _compare_png(before, after, 0.87)
        with Image.open(io.BytesIO(result)) as picture:
            drawn = f"{picture.width}×{picture.height}"
        press = functools.partial(_compare_png, before, after, 0.87)
        cpu = timed(press, args.repeats, time.process_time)
        wall = timed(press, args.repeats)
        print(
            f"| {width}×{height} | {drawn} | {len(result) / 2**20:.2f} MiB | "
            f"{cpu * 1000:.0f} ms | ({wall * 1000:.0f} ms) |"
        )


if __name__ == "__main__":
    main()
