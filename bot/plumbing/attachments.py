"""Photos members attach to commands: checked, downloaded, decoded safely, stored.

Order matters, cheapest refusal first: the size Discord reports and the content
type before downloading anything; after the download, the magic bytes and the
pixel count from the header before decoding (`pipeline.contract.images.open_image`, run in
a thread so a big JPEG never blocks the heartbeat). What is stored is a fresh PNG
of the decoded, upright, opaque image, so workers never see the member's file.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass, field

import aiohttp
import discord
from PIL import Image

from bot.errors import UserError
from pipeline.contract.blobs import BlobStore, sha256_hex
from pipeline.contract.config import Config
from pipeline.contract.images import ACCEPTED_TYPES, open_image

MiB = 1024 * 1024


@dataclass(frozen=True)
class Photo:
    """An attachment, decoded and re-encoded as a clean PNG (not stored yet: that
    happens only once the whole request is valid, so refusals leave no files)."""

    png: bytes = field(repr=False)
    sha256: str
    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def check_before_download(attachment: discord.Attachment, config: Config, name: str) -> None:
    """Refuse by the reported size and type, so nothing large or foreign is fetched."""
    limit_mb = config.attachments.max_mb
    if attachment.size > limit_mb * MiB:
        raise UserError(
            f"the {name} ({attachment.filename}) is {attachment.size / MiB:.1f} MB; "
            f"the limit is {limit_mb:g} MB"
        )
    content_type = (attachment.content_type or "").split(";")[0].strip()
    # No type reported: the magic bytes decide after the download.
    if content_type and not content_type.startswith("image/"):
        raise UserError(
            f"the {name} ({attachment.filename}) is {content_type}, not an image "
            f"(expected {ACCEPTED_TYPES})"
        )


async def download(attachment: discord.Attachment, config: Config, name: str) -> bytes:
    try:
        data = await attachment.read()
    except (discord.HTTPException, aiohttp.ClientError, asyncio.TimeoutError):
        raise UserError(f"could not download the {name}; try attaching it again") from None
    # The reported size is what Discord claims; the bytes are what we got.
    limit = config.attachments.max_mb * MiB
    if len(data) > limit:
        raise UserError(
            f"the {name} is {len(data) / MiB:.1f} MB; the limit is {config.attachments.max_mb:g} MB"
        )
    return data


def decode_and_encode(data: bytes, max_pixels: int, name: str) -> Photo:
    """Safe decode (type, header size, EXIF, transparency) and a clean PNG; in a thread."""
    image = open_image(data, max_pixels=max_pixels, name=f"the {name}")
    png = png_of(image)
    return Photo(png, sha256_hex(png), image.width, image.height)


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=4)  # level 4: much faster, barely larger
    return buffer.getvalue()


async def read_photo(attachment: discord.Attachment, config: Config, name: str = "image") -> Photo:
    """Check, download and decode one attached photo; UserError/ImageInputError name
    the problem and the limit."""
    check_before_download(attachment, config, name)
    data = await download(attachment, config, name)
    return await asyncio.to_thread(decode_and_encode, data, config.limits.max_input_pixels, name)


def store_photos(blobs: BlobStore, photos: list[Photo]) -> None:
    """Into the blob store, where workers read them by sha256 (call in a thread)."""
    for photo in photos:
        blobs.put(photo.png, ".png")
