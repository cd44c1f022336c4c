"""Turning a member's photos into a training set for a personal model.

A member attaches 3-20 photos and/or a .zip. Each photo is checked (is it an
image, is it intact, is it big enough, is it a near-copy of another one), cut
to a square around the face when there is one, resized, and captioned
"photo of <token> <subject>" the way kohya and DreamBooth do. One photo in
five is held out to check the model on. Every photo gets a line in the report
saying whether it was used and why not, so the member knows what to fix.

No torch here: the bot can run this to validate an upload before queueing.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.contract.images import ACCEPTED_TYPES, ImageInputError, open_image
from pipeline.faces.detection import FaceBox, detect_faces

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".gif", ".bmp")
FACE_SHARE_OF_CROP = 0.4  # face width / crop width: head, hair and a bit of shoulder
FACE_BELOW_CENTRE = 0.25  # face centre sits this many face-heights above the crop centre
DUPLICATE_BITS = 6  # of 64 difference-hash bits; re-encodes and resizes differ by 0-3
_READ_CHUNK = 1 << 16


class DatasetError(ValueError):
    """The photos cannot make a training set; the message is shown to the member as is."""


@dataclass(frozen=True)
class DatasetLimits:
    """Upload limits; the defaults suit a phone's photos on a small server."""

    max_pixels: int = 50_000_000  # per photo; 48 MP phone cameras still fit
    zip_max_entries: int = 200
    zip_max_total_bytes: int = 200_000_000
    zip_max_ratio: float = 100.0  # photos barely compress; 100:1 is a bomb, not a photo


DEFAULT_LIMITS = DatasetLimits()


@dataclass
class PhotoReport:
    """What happened to one uploaded file; `reason` reads after "name: "."""

    name: str
    accepted: bool
    reason: str


@dataclass
class TrainImage:
    """One square, captioned training photo (`resolution`×`resolution`, RGB)."""

    image: Image.Image
    caption: str
    name: str
    face_found: bool


@dataclass
class PreparedDataset:
    train: list[TrainImage]
    test: list[TrainImage]
    report: list[PhotoReport]
    token: str
    subject: str


# ---------------------------------------------------------------- zip archives


def read_zip_safely(
    data: bytes, *, max_entries: int, max_total_bytes: int, max_ratio: float
) -> list[tuple[str, bytes]]:
    """The image files inside a .zip as (path in archive, bytes).

    Refuses the whole archive (DatasetError) for an unsafe path (`../`, an
    absolute path or a drive letter), too many entries, too many bytes once
    unpacked, or an entry compressed more than `max_ratio`:1 (a zip bomb).
    Sizes are checked from the headers first and again while unpacking,
    because headers can lie. Folders, dotfiles and `__MACOSX` are skipped;
    other non-images are left out (see `read_zip_with_report`).
    """
    files, _skipped = read_zip_with_report(
        data, max_entries=max_entries, max_total_bytes=max_total_bytes, max_ratio=max_ratio
    )
    return files


def read_zip_with_report(
    data: bytes, *, max_entries: int, max_total_bytes: int, max_ratio: float
) -> tuple[list[tuple[str, bytes]], list[PhotoReport]]:
    """Like `read_zip_safely`, plus a rejected line for each non-image file left out."""
    limits = _ZipLimits(max_total_bytes, max_ratio, archive_size=len(data))
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
            if len(entries) > max_entries:
                raise DatasetError(
                    f"the archive has {len(entries)} entries; the limit is {max_entries}"
                )
            images, skipped = _choose_entries(entries)
            _check_declared_sizes(images, limits)
            files = _unpack(archive, images, limits)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as error:
        # zipfile stops at the declared size and checks the CRC, so a header
        # that understates an entry's size ends up here too.
        raise DatasetError("the archive could not be read: it is corrupt or not a .zip") from error
    return files, skipped


@dataclass(frozen=True)
class _ZipLimits:
    max_total_bytes: int
    max_ratio: float
    # An entry cannot hold more compressed bytes than the whole archive, whatever
    # its header claims; ratios are measured against the smaller of the two.
    archive_size: int

    def check_ratio(self, entry: zipfile.ZipInfo, unpacked: int) -> None:
        packed = max(1, min(entry.compress_size, self.archive_size))
        if unpacked / packed > self.max_ratio:
            raise DatasetError(
                f"the archive entry {entry.filename!r} is compressed {unpacked / packed:.0f}:1; "
                f"the limit is {self.max_ratio:.0f}:1 (a zip bomb?)"
            )

    def too_big(self, total: int) -> DatasetError:
        return DatasetError(
            f"the archive unpacks to {total / 1e6:.1f} MB; "
            f"the limit is {self.max_total_bytes / 1e6:.1f} MB"
        )


def _choose_entries(
    entries: list[zipfile.ZipInfo],
) -> tuple[list[zipfile.ZipInfo], list[PhotoReport]]:
    images: list[zipfile.ZipInfo] = []
    skipped: list[PhotoReport] = []
    for entry in entries:
        parts = _safe_parts(entry.filename)
        if entry.is_dir() or any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue  # folders and the junk macOS and editors leave behind
        if entry.flag_bits & 0x1:
            raise DatasetError(f"the archive entry {entry.filename!r} is password-protected")
        if entry.filename.lower().endswith(IMAGE_EXTENSIONS):
            images.append(entry)
        else:
            reason = f"not an image (expected {ACCEPTED_TYPES})"
            skipped.append(PhotoReport(entry.filename, False, reason))
    return images, skipped


def _safe_parts(name: str) -> list[str]:
    """Path parts of an archive entry, or DatasetError if it could escape the folder."""
    normal = name.replace("\\", "/")
    escapes = (
        normal.startswith("/")
        or re.match(r"^[A-Za-z]:", normal) is not None
        or "\x00" in normal
        or ".." in normal.split("/")
    )
    if escapes:
        raise DatasetError(f"the archive has an unsafe path: {name!r}")
    return [part for part in normal.split("/") if part]


def _check_declared_sizes(entries: list[zipfile.ZipInfo], limits: _ZipLimits) -> None:
    total = sum(entry.file_size for entry in entries)
    if total > limits.max_total_bytes:
        raise limits.too_big(total)
    for entry in entries:
        limits.check_ratio(entry, entry.file_size)


def _unpack(
    archive: zipfile.ZipFile, entries: list[zipfile.ZipInfo], limits: _ZipLimits
) -> list[tuple[str, bytes]]:
    files: list[tuple[str, bytes]] = []
    total = 0
    for entry in entries:
        content = _read_entry(archive, entry, limits, already_read=total)
        total += len(content)
        files.append((entry.filename, content))
    return files


def _read_entry(
    archive: zipfile.ZipFile, entry: zipfile.ZipInfo, limits: _ZipLimits, already_read: int
) -> bytes:
    """Unpack one entry in chunks, stopping as soon as it outgrows a limit or its header."""
    chunks: list[bytes] = []
    size = 0
    with archive.open(entry) as stream:
        while chunk := stream.read(_READ_CHUNK):
            size += len(chunk)
            if size > entry.file_size:
                raise DatasetError(
                    f"the archive entry {entry.filename!r} unpacks to more than its "
                    f"header says ({entry.file_size} bytes); the archive is not safe to read"
                )
            if already_read + size > limits.max_total_bytes:
                raise limits.too_big(already_read + size)
            limits.check_ratio(entry, size)
            chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------- near-duplicates


def difference_hash(image: Image.Image, size: int = 8) -> int:
    """64-bit dHash: which neighbour is brighter on a tiny greyscale copy.

    Survives resizing, re-encoding and small colour changes, so a photo sent
    twice (or the same shot at two sizes) hashes to nearly the same bits.
    """
    small = image.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).ravel()
    return int("".join("1" if bit else "0" for bit in bits), 2)


def hash_distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


# ---------------------------------------------------------------- crops


def face_square(
    face: FaceBox, image_size: tuple[int, int], min_side: int
) -> tuple[int, int, int, int]:
    """Square (x0, y0, x1, y1) where the face fills ~40% of the width, inside the image.

    Never smaller than `min_side` (when the photo allows) so a small face in a
    big photo is not blown up into a blurry training image.
    """
    width, height = image_size
    short = min(width, height)
    side = min(short, max(round(face.w / FACE_SHARE_OF_CROP), min(min_side, short)))
    cx, cy = face.center
    cy += FACE_BELOW_CENTRE * face.h  # room for hair above, chin and neck below
    x0 = max(0, min(round(cx - side / 2), width - side))
    y0 = max(0, min(round(cy - side / 2), height - side))
    return (x0, y0, x0 + side, y0 + side)


def centre_square(image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    width, height = image_size
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return (x0, y0, x0 + side, y0 + side)


def _square_crop(
    image: Image.Image, resolution: int, min_side: int, crop_to_face: bool
) -> tuple[Image.Image, bool]:
    faces = detect_faces(image) if crop_to_face else []
    box = face_square(faces[0], image.size, min_side) if faces else centre_square(image.size)
    square = image.crop(box).resize((resolution, resolution), Image.Resampling.LANCZOS)
    return square, bool(faces)


# ---------------------------------------------------------------- tokens


# Consonants only, so the token is never an English word; a rare first letter
# keeps it off common abbreviations too.
_FIRST = "jkqvxz"
_REST = "bcdfghjklmnpqrstvwxz"
_ABBREVIATIONS = {
    "jfk",
    "jpg",
    "kfc",
    "vhs",
    "qvc",
    "jpm",
    "kgb",
    "jwt",
    "vpn",
    "xbl",
    "jcb",
    "zdf",
}


def rare_token(seed_text: str) -> str:
    """A short, made-up trigger word for one model (like DreamBooth's "sks").

    Deterministic from `seed_text` (the model name), so retraining the same
    model gives the same word; no doubled letters and no known abbreviation.
    """
    counter = 0
    while True:
        digest = hashlib.sha256(f"{seed_text}\x00{counter}".encode()).digest()
        length = 3 + digest[0] % 2
        letters = [_FIRST[digest[1] % len(_FIRST)]]
        letters += [_REST[byte % len(_REST)] for byte in digest[2 : 1 + length]]
        token = "".join(letters)
        doubled = any(a == b for a, b in zip(token, token[1:], strict=False))
        if not doubled and token not in _ABBREVIATIONS:
            return token
        counter += 1


# ---------------------------------------------------------------- the whole set


def prepare_dataset(
    photos: list[tuple[str, bytes]],
    *,
    zip_data: bytes | None = None,
    resolution: int = 512,
    min_side: int = 256,
    subject: str = "person",
    token: str | None = None,
    max_photos: int = 20,
    min_photos: int = 3,
    test_fraction: float = 0.2,
    seed: int = 0,
    crop_to_face: bool = True,
    limits: DatasetLimits = DEFAULT_LIMITS,
) -> PreparedDataset:
    """Check, crop, resize and caption the photos; split off a test set.

    Raises DatasetError when fewer than `min_photos` photos are usable (naming
    each rejected one and why) or more than `max_photos` were sent.
    """
    # 1. Collect files from the attachments and the archive.
    report: list[PhotoReport] = []
    files = list(photos)
    if zip_data is not None:
        unpacked, skipped = read_zip_with_report(
            zip_data,
            max_entries=limits.zip_max_entries,
            max_total_bytes=limits.zip_max_total_bytes,
            max_ratio=limits.zip_max_ratio,
        )
        files += unpacked
        report += skipped
    if len(files) > max_photos:
        raise DatasetError(f"{len(files)} photos were sent; the limit is {max_photos}")

    # 2. Keep the photos that decode, are big enough and are not near-copies.
    token = token or rare_token(subject)
    caption = f"photo of {token} {subject}"
    usable: list[TrainImage] = []
    hashes: list[tuple[str, int]] = []
    for name, data in files:
        image, reason = _check_photo(name, data, min_side, limits.max_pixels, hashes)
        if image is None:
            report.append(PhotoReport(name, False, reason))
            continue
        # 3. Square crop around the face (or the centre) at the training size.
        square, face_found = _square_crop(image, resolution, min_side, crop_to_face)
        usable.append(TrainImage(square, caption, name, face_found))
        found = "face found, cropped around it" if face_found else "no face found, centre crop"
        report.append(PhotoReport(name, True, found))

    # 4. Enough left to train on?
    if len(usable) < min_photos:
        problems = "; ".join(f"{r.name}: {r.reason}" for r in report if not r.accepted)
        raise DatasetError(
            f"only {len(usable)} usable photo{'' if len(usable) == 1 else 's'} "
            f"(need at least {min_photos})" + (f": {problems}" if problems else "")
        )

    # 5. Hold out a few photos, the same ones for the same seed.
    train, test = _split(usable, test_fraction, seed)
    return PreparedDataset(train, test, report, token, subject)


def _check_photo(
    name: str, data: bytes, min_side: int, max_pixels: int, hashes: list[tuple[str, int]]
) -> tuple[Image.Image | None, str]:
    """The upright photo, or None and why not. Adds its hash to `hashes` when kept."""
    try:
        image = open_image(data, max_pixels=max_pixels, name=name)
    except ImageInputError as error:
        # The message starts with the file name, which the report shows already.
        return None, str(error).removeprefix(f"{name} ").removeprefix("is ")
    width, height = image.size
    if min(width, height) < min_side:
        return (
            None,
            f"too small ({width}×{height}); the shorter side must be at least {min_side} px",
        )
    fingerprint = difference_hash(image)
    for other, other_print in hashes:
        if hash_distance(fingerprint, other_print) <= DUPLICATE_BITS:
            return None, f"near-duplicate of {other}"
    hashes.append((name, fingerprint))
    return image, ""


def _split(
    usable: list[TrainImage], test_fraction: float, seed: int
) -> tuple[list[TrainImage], list[TrainImage]]:
    test_count = max(1, round(len(usable) * test_fraction))
    held_out = set(random.Random(seed).sample(range(len(usable)), test_count))
    train = [item for i, item in enumerate(usable) if i not in held_out]
    test = [item for i, item in enumerate(usable) if i in held_out]
    return train, test


def dataset_summary(report: list[PhotoReport], *, max_lines: int = 15) -> str:
    """A few lines for the member: how many photos were used, and why others were not."""
    accepted = [r for r in report if r.accepted]
    rejected = [r for r in report if not r.accepted]
    with_face = sum(1 for r in accepted if r.reason.startswith("face found"))
    lines = [f"Accepted {len(accepted)} photo(s) ({with_face} with a face found)."]
    if rejected:
        lines.append(f"Rejected {len(rejected)}:")
        lines += [f"• {r.name}: {r.reason}" for r in rejected[:max_lines]]
        if len(rejected) > max_lines:
            lines.append(f"…and {len(rejected) - max_lines} more")
    return "\n".join(lines)
