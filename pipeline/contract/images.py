"""Safe decoding of images that members upload.

Every photo that reaches the bot, the CLI or a worker goes through `open_image`:
it checks the file type from its first bytes, refuses a picture whose header
claims more pixels than allowed *before* decoding it (a decompression bomb), and
turns whatever PIL raises on a broken file into one short message a member can
read. No torch here, so the bot can use it.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's own guard is a backstop behind our header check: it raises
# DecompressionBombError above twice this many pixels in any code path that
# opens an image without going through `open_image`. 64 MP is far above any
# photo limit the bot uses, so it never fires first on legitimate input.
HARD_PIXEL_LIMIT = 64_000_000
if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > HARD_PIXEL_LIMIT:
    Image.MAX_IMAGE_PIXELS = HARD_PIXEL_LIMIT

# First bytes of each format we accept, checked before PIL sees the data so a
# text file or an archive is never handed to a decoder.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)
ACCEPTED_TYPES = "PNG, JPEG, WebP, GIF or BMP"


class ImageInputError(ValueError):
    """A photo the bot will not use; the message is shown to the member as is."""


def sniff_image_type(data: bytes) -> str | None:
    """Return "png", "jpeg", "webp", "gif" or "bmp" from the magic bytes, else None."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for signature, kind in _SIGNATURES:
        if data.startswith(signature):
            return kind
    return None


def open_image(data: bytes, *, max_pixels: int, name: str = "image") -> Image.Image:
    """Decode an uploaded photo into an upright RGB image, or raise ImageInputError.

    Transparency is flattened onto white and the EXIF orientation is applied, so
    what comes back is what the member saw on their screen.
    """
    # 1. Type from the magic bytes, not from the file name.
    if sniff_image_type(data) is None:
        raise ImageInputError(f"{name} is not an image (expected {ACCEPTED_TYPES})")
    # 2. Size from the header only: PIL's open is lazy and reads no pixel data.
    image = _open_lazily(data, name, max_pixels)
    _check_pixel_count(image, max_pixels, name)
    # 3. Decode for real; truncated or corrupt data fails here.
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise _corrupt(name) from error
    return _to_rgb(image)


def _open_lazily(data: bytes, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own limit decides; PIL's warning would only be noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise _too_large(name, _size_past_guard(data), max_pixels) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise _corrupt(name) from error


def _check_pixel_count(image: Image.Image, max_pixels: int, name: str) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise _corrupt(name)
    if width * height > max_pixels:
        raise _too_large(name, (width, height), max_pixels)


def _too_large(name: str, size: tuple[int, int] | None, max_pixels: int) -> ImageInputError:
    limit = f"the limit is {max_pixels / 1e6:.1f} MP"
    if size is None:
        return ImageInputError(f"{name} has far too many pixels; {limit}")
    width, height = size
    return ImageInputError(f"{name} is {width}×{height} ({width * height / 1e6:.1f} MP); {limit}")


def _size_past_guard(data: bytes) -> tuple[int, int] | None:
    """Header size of an image PIL's own bomb guard refused, to name it in the message.

    Calls the format's reader directly (it parses only the header), because
    `Image.open` raises before telling us the size.
    """
    kind = sniff_image_type(data)
    try:
        factory, _accept = Image.OPEN[(kind or "").upper()]
        return factory(io.BytesIO(data), "").size
    except Exception:  # noqa: BLE001 - only for a nicer message; any failure means "unknown"
        return None


def _corrupt(name: str) -> ImageInputError:
    return ImageInputError(f"{name} could not be decoded: the file is corrupt or truncated")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        image = _high_bit_depth_to_8bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if not has_alpha:
        return image.convert("RGB")
    # Transparent pixels have arbitrary colours underneath; white is what a
    # Discord client shows behind them in light mode and what users expect.
    rgba = image.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    # PIL's convert("L") clips 16-bit values instead of scaling them, which
    # turns most 16-bit greyscale PNGs white.
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if values.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(values / top * 255.0, 0, 255).astype(np.uint8), "L")


def working_size(width: int, height: int, pixel_budget: int) -> tuple[int, int]:
    """The size img2img/inpaint work at: the photo's shape within the member's pixel
    budget (their default width × height), never upscaled, in multiples of 8."""
    scale = min(1.0, (pixel_budget / (width * height)) ** 0.5)
    return max(64, int(width * scale) // 8 * 8), max(64, int(height * scale) // 8 * 8)
