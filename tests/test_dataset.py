"""Safe image decoding, safe zip reading and training-set preparation on real photos."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipeline.contract.images import ImageInputError, open_image, sniff_image_type
from pipeline.faces.detection import detect_faces
from pipeline.training.dataset import (
    DatasetError,
    PreparedDataset,
    dataset_summary,
    prepare_dataset,
    rare_token,
    read_zip_safely,
)

LIMIT = 4_200_000  # 4.2 MP, the bot's default photo limit


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def encode(image: Image.Image, kind: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def rotated_for_exif(image: Image.Image) -> bytes:
    """JPEG whose pixels lie on their side, with orientation 6 telling viewers to turn them."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    return encode(image.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92, exif=exif)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(side: int) -> bytes:
    """A valid black 1-bit PNG of side×side pixels: ~50 KB that decodes to `side`² pixels."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row * 1000) for _ in range(side // 1000))
    pixels += packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", pixels)
        + png_chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------- open_image


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = bomb_png(20000)
    assert len(bomb) < 200_000
    with pytest.raises(ImageInputError) as refused:
        open_image(bomb, max_pixels=LIMIT)
    assert str(refused.value) == "image is 20000×20000 (400.0 MP); the limit is 4.2 MP"
    # Refused from the header alone (not by timing it, which depends on the CPU): the
    # same header over pixel data that cannot be decoded gets the same message.
    header_only = bomb[: bomb.index(b"IDAT") + 4] + b"\xff" * 64
    with pytest.raises(ImageInputError, match=r"^image is 20000×20000 \(400.0 MP\)"):
        open_image(header_only, max_pixels=LIMIT)
    # PIL's own guard stands behind ours for code that opens images directly.
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))


def test_photo_over_the_limit_names_its_size() -> None:
    big = encode(Image.new("RGB", (2500, 2000), "gray"))
    with pytest.raises(ImageInputError, match=r"^holiday.png is 2500×2000 \(5.0 MP\); the limit"):
        open_image(big, max_pixels=LIMIT, name="holiday.png")


def test_text_file_is_not_an_image() -> None:
    with pytest.raises(ImageInputError, match="notes.txt is not an image"):
        open_image(b"just some notes\n", max_pixels=LIMIT, name="notes.txt")


def test_truncated_png_is_refused() -> None:
    data = encode(photo("coffee"))
    with pytest.raises(ImageInputError) as refused:
        open_image(data[: len(data) // 2], max_pixels=LIMIT, name="coffee.png")
    assert str(refused.value) == (
        "coffee.png could not be decoded: the file is corrupt or truncated"
    )


def test_transparency_is_flattened_onto_white() -> None:
    rgba = Image.new("RGBA", (40, 20), (0, 0, 255, 255))
    rgba.paste((255, 0, 0, 0), (0, 0, 20, 20))  # left half: red but fully transparent
    image = open_image(encode(rgba), max_pixels=LIMIT)
    assert image.mode == "RGB"
    assert image.getpixel((5, 5)) == (255, 255, 255)
    assert image.getpixel((35, 5)) == (0, 0, 255)


def test_exif_orientation_is_applied() -> None:
    coffee = photo("coffee")  # 600×400, landscape
    image = open_image(rotated_for_exif(coffee), max_pixels=LIMIT)
    assert image.size == coffee.size
    difference = np.abs(np.asarray(image, dtype=int) - np.asarray(coffee, dtype=int))
    assert difference.mean() < 6  # JPEG noise only, not a quarter turn


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_every_accepted_format_is_sniffed_and_decoded(kind: str) -> None:
    data = encode(photo("chelsea").resize((64, 48)), kind)
    assert sniff_image_type(data) == kind.lower()
    image = open_image(data, max_pixels=LIMIT)
    assert (image.mode, image.size) == ("RGB", (64, 48))


def test_unknown_bytes_are_not_sniffed() -> None:
    assert sniff_image_type(b"PK\x03\x04 a zip") is None
    assert sniff_image_type(b"") is None


# ---------------------------------------------------------------- zip archives


def make_zip(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, content in files.items():
            archive.writestr(zipfile.ZipInfo(name), content, compress_type=method)
    return buffer.getvalue()


def read(data: bytes, **limits) -> list[tuple[str, bytes]]:
    settings = {"max_entries": 50, "max_total_bytes": 50_000_000, "max_ratio": 100.0} | limits
    return read_zip_safely(data, **settings)


def test_zip_gives_its_images_and_skips_junk() -> None:
    small = encode(photo("chelsea").resize((40, 30)), "JPEG")
    archive = make_zip(
        {
            "cat.jpg": small,
            "holiday/cat2.PNG": small,
            "holiday/": b"",
            "__MACOSX/holiday/._cat2.PNG": b"junk",
            ".DS_Store": b"junk",
            "readme.txt": b"hello",
        }
    )
    assert read(archive) == [("cat.jpg", small), ("holiday/cat2.PNG", small)]


@pytest.mark.parametrize(
    "name",
    ["../evil.png", "photos/../../evil.png", "/etc/evil.png", "C:\\evil.png", "a\\..\\x.png"],
)
def test_zip_path_that_escapes_is_refused(name: str) -> None:
    archive = make_zip({"fine.png": b"x", name: b"x"})
    with pytest.raises(DatasetError, match="unsafe path") as refused:
        read(archive)
    assert repr(name) in str(refused.value)


def test_zip_with_too_many_entries_is_refused() -> None:
    archive = make_zip({f"p{i}.png": b"x" for i in range(30)})
    with pytest.raises(DatasetError, match="30 entries; the limit is 20"):
        read(archive, max_entries=20)


def test_zip_bomb_is_refused() -> None:
    archive = make_zip({"bomb.png": bytes(20_000_000)})
    assert len(archive) < 100_000
    with pytest.raises(DatasetError, match=r"'bomb.png' is compressed \d+:1; the limit is 100:1"):
        read(archive)


def test_zip_over_the_total_size_is_refused() -> None:
    noise = np.random.default_rng(0).bytes(300_000)  # does not compress, so no ratio alarm
    archive = make_zip({"a.png": noise, "b.png": noise}, zipfile.ZIP_STORED)
    with pytest.raises(DatasetError, match="unpacks to 0.6 MB; the limit is 0.5 MB"):
        read(archive, max_total_bytes=500_000)


def _declaring(archive: bytes, size_field: str, value: int) -> bytes:
    """The one-member archive with a size its headers declare forged, in both the local and
    the central header: "packed" (compressed size, local offset 18) or "unpacked"
    (uncompressed size, offset 22). The central header's fields sit 2 bytes later: it
    adds "version made by"."""
    offset = {"packed": 18, "unpacked": 22}[size_field]
    forged = bytearray(archive)
    local = forged.index(b"PK\x03\x04")
    central = forged.index(b"PK\x01\x02") + 2
    for header in (local, central):
        forged[header + offset : header + offset + 4] = struct.pack("<I", value)
    return bytes(forged)


def test_zip_whose_headers_understate_the_size_is_refused() -> None:
    # Claim 1000 bytes unpacked in both the local and the central header, so the
    # declared ratio and total look harmless.
    archive = _declaring(make_zip({"liar.png": bytes(2_000_000)}), "unpacked", 1000)
    with pytest.raises(DatasetError, match="corrupt"):  # zipfile stops at 1000 bytes: bad CRC
        read(archive, max_total_bytes=100_000)


def test_zip_bomb_whose_headers_overstate_the_packed_size_is_refused() -> None:
    # Claim 10 MB compressed so the declared ratio looks like 2:1.
    archive = _declaring(make_zip({"bomb.png": bytes(20_000_000)}), "packed", 10_000_000)
    with pytest.raises(DatasetError, match="'bomb.png' is compressed"):
        read(archive)


def test_not_a_zip_is_refused() -> None:
    with pytest.raises(DatasetError, match="could not be read"):
        read(b"this is not an archive")


# ---------------------------------------------------------------- prepare_dataset


@pytest.fixture(scope="module")
def uploads() -> list[tuple[str, bytes]]:
    astronaut, coffee = photo("astronaut"), photo("coffee")
    truncated = encode(photo("rocket"))
    return [
        ("astronaut.jpg", encode(astronaut, "JPEG", quality=90)),
        # A different framing of the same shoot, stored on its side with EXIF 6.
        ("astronaut_turned.jpg", rotated_for_exif(astronaut.crop((40, 0, 440, 400)))),
        ("coffee.png", encode(coffee)),
        ("cat.webp", encode(photo("chelsea"), "WEBP", quality=90)),
        ("cameraman.png", encode(photo("camera"))),
        ("notes.txt", b"my best photos\n"),
        ("broken.png", truncated[: len(truncated) // 3]),
        ("coffee_again.jpg", encode(coffee.resize((540, 360)), "JPEG", quality=70)),
        ("tiny.png", encode(photo("coffee").resize((120, 80)))),
    ]


@pytest.fixture(scope="module")
def prepared(uploads: list[tuple[str, bytes]]) -> PreparedDataset:
    return prepare_dataset(uploads, token="zqv", resolution=256, min_side=256)


def test_report_says_what_happened_to_each_photo(prepared: PreparedDataset) -> None:
    verdicts = {r.name: (r.accepted, r.reason) for r in prepared.report}
    assert [r.name for r in prepared.report if r.accepted] == [
        "astronaut.jpg",
        "astronaut_turned.jpg",
        "coffee.png",
        "cat.webp",
        "cameraman.png",
    ]
    assert verdicts["notes.txt"] == (False, "not an image (expected PNG, JPEG, WebP, GIF or BMP)")
    assert verdicts["broken.png"] == (
        False,
        "could not be decoded: the file is corrupt or truncated",
    )
    assert verdicts["coffee_again.jpg"] == (False, "near-duplicate of coffee.png")
    assert verdicts["tiny.png"] == (
        False,
        "too small (120×80); the shorter side must be at least 256 px",
    )


def test_faces_are_found_only_in_portraits(prepared: PreparedDataset) -> None:
    found = {item.name: item.face_found for item in prepared.train + prepared.test}
    # The turned astronaut is only found because EXIF orientation was applied.
    assert found == {
        "astronaut.jpg": True,
        "astronaut_turned.jpg": True,
        "coffee.png": False,
        "cat.webp": False,
        "cameraman.png": True,
    }


def test_images_are_square_captioned_and_split(prepared: PreparedDataset) -> None:
    items = prepared.train + prepared.test
    assert {(item.image.mode, item.image.size) for item in items} == {("RGB", (256, 256))}
    assert {item.caption for item in items} == {"photo of zqv person"}
    assert (prepared.token, prepared.subject) == ("zqv", "person")
    assert len(prepared.test) == 1 and len(prepared.train) == 4
    assert not {i.name for i in prepared.train} & {i.name for i in prepared.test}


def test_face_crop_frames_the_face(prepared: PreparedDataset) -> None:
    item = next(i for i in prepared.train + prepared.test if i.name == "astronaut.jpg")
    faces = detect_faces(item.image)
    assert len(faces) == 1
    share = faces[0].w / item.image.width
    assert 0.3 <= share <= 0.55  # head and some shoulder, not a passport photo
    assert 0.3 < faces[0].center[0] / item.image.width < 0.7


def test_summary_lists_the_rejected_photos(prepared: PreparedDataset) -> None:
    summary = dataset_summary(prepared.report)
    assert summary.startswith("Accepted 5 photo(s) (3 with a face found).\nRejected 4:")
    assert "• tiny.png: too small (120×80)" in summary
    assert "• coffee_again.jpg: near-duplicate of coffee.png" in summary


def test_zip_and_attachments_are_combined(uploads: list[tuple[str, bytes]]) -> None:
    files = dict(uploads)
    archive = make_zip({"a/coffee.png": files["coffee.png"], "a/notes.txt": b"x"})
    prepared = prepare_dataset(
        [("cat.webp", files["cat.webp"]), ("camera.png", files["cameraman.png"])],
        zip_data=archive,
        crop_to_face=False,
        subject="thing",
    )
    verdicts = {r.name: r.accepted for r in prepared.report}
    assert verdicts == {
        "a/notes.txt": False,
        "cat.webp": True,
        "camera.png": True,
        "a/coffee.png": True,
    }
    assert prepared.train[0].caption == f"photo of {rare_token('thing')} thing"


def test_split_is_the_same_for_the_same_seed(uploads: list[tuple[str, bytes]]) -> None:
    files = dict(uploads)
    photos = [(name, files[name]) for name in ("coffee.png", "cat.webp", "cameraman.png")]
    photos += [
        ("rocket.png", encode(photo("rocket"))),
        ("hubble.jpg", encode(photo("hubble_deep_field"), "JPEG")),
    ]

    def held_out(seed: int) -> list[str]:
        prepared = prepare_dataset(photos, seed=seed, crop_to_face=False, resolution=64)
        return [item.name for item in prepared.test]

    assert held_out(1) == held_out(1)
    assert {name for seed in range(6) for name in held_out(seed)} != {held_out(1)[0]}


def test_too_few_usable_photos_is_an_error(uploads: list[tuple[str, bytes]]) -> None:
    files = dict(uploads)
    photos = [(name, files[name]) for name in ("coffee.png", "cat.webp", "notes.txt", "tiny.png")]
    with pytest.raises(DatasetError) as refused:
        prepare_dataset(photos, crop_to_face=False)
    message = str(refused.value)
    assert message.startswith("only 2 usable photos (need at least 3): notes.txt: not an image")
    assert "tiny.png: too small" in message


def test_too_many_photos_is_an_error(uploads: list[tuple[str, bytes]]) -> None:
    with pytest.raises(DatasetError, match="9 photos were sent; the limit is 8"):
        prepare_dataset(uploads, max_photos=8)


def test_rare_token_is_short_made_up_and_stable() -> None:
    tokens = {name: rare_token(name) for name in ("alice", "rex the dog", "my mug", "Bob")}
    assert tokens == {name: rare_token(name) for name in tokens}
    assert len(set(tokens.values())) == len(tokens)
    for token in tokens.values():
        assert 3 <= len(token) <= 4 and token.isascii() and token.islower()
        assert not set(token) & set("aeiouy")  # no vowels: never an English word
