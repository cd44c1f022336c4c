"""The before/after picture behind /edit's Compare button: photo and result side by
side at one height, labelled, with the identity score written under them.

Pure Pillow and torch-free, so the bot can draw it from the two stored PNGs when a
member presses Compare, without a worker.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

MAX_PANEL_HEIGHT = 768  # Discord shows ~400 px; more only costs upload bytes
GAP = 8
BACKGROUND = (32, 34, 37)  # Discord's dark theme, so the picture sits in the message
TEXT = (235, 235, 235)
MUTED = (170, 170, 170)


def identity_caption(score: float | None) -> str:
    """ "identity 0.93", or that the result showed no face to measure."""
    return "identity: no face in the result" if score is None else f"identity {score:.2f}"


def compare_picture(
    before: Image.Image,
    after: Image.Image,
    score: float | None,
    *,
    max_height: int = MAX_PANEL_HEIGHT,
) -> Image.Image:
    """Photo and result side by side at the photo's height (at most `max_height`).

    A band under them reads "before" and "after" over each picture and the identity
    score in the middle; `score` None says the result showed no face.
    """
    height = min(max_height, before.height)
    left, right = _at_height(before, height), _at_height(after, height)
    band = max(28, height // 10)
    canvas = Image.new("RGB", (left.width + GAP + right.width, height + band), BACKGROUND)
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + GAP, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=round(band * 0.5))
    middle = height + band / 2
    draw.text((band / 3, middle), "before", font=font, fill=MUTED, anchor="lm")
    draw.text((canvas.width - band / 3, middle), "after", font=font, fill=MUTED, anchor="rm")
    caption = identity_caption(score)
    draw.text((canvas.width / 2, middle), caption, font=font, fill=TEXT, anchor="mm")
    return canvas


def _at_height(image: Image.Image, height: int) -> Image.Image:
    image = image.convert("RGB")
    width = max(1, round(image.width * height / image.height))
    if (width, height) == image.size:
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)
