"""BlobStore on real filesystems: a tmp dir, a tiny tmpfs, and a process file-size limit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from pipeline.contract.blobs import BlobError, BlobNotFound, BlobStore, sha256_hex


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_put_get_roundtrip(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    sha = store.put(b"hello", ".png")
    assert sha == sha256_hex(b"hello")
    assert store.get(sha) == b"hello"
    assert store.exists(sha)
    assert store.size(sha) == 5
    assert store.path(sha) == tmp_path / sha[:2] / f"{sha}.png"


def test_put_is_idempotent(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    first = store.put(b"same bytes", ".png")
    mtime = store.path(first).stat().st_mtime_ns
    assert store.put(b"same bytes", ".png") == first
    assert store.put(b"same bytes") == first  # another suffix is still the same blob
    assert _files(tmp_path) == [store.path(first)]
    assert store.path(first).stat().st_mtime_ns == mtime


def test_no_temp_files_left(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    shas = [store.put(os.urandom(1000), ".bin") for _ in range(20)]
    assert [p.name for p in _files(tmp_path)] == sorted(f"{s}.bin" for s in shas)


def test_delete(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    sha = store.put(b"x")
    assert store.delete(sha) is True
    assert not store.exists(sha)
    assert store.delete(sha) is False
    with pytest.raises(BlobNotFound):
        store.get(sha)


@pytest.mark.parametrize(
    "bad",
    ["../etc/passwd", "ab/../../x", "A" * 64, "g" * 64, "a" * 63, "a" * 65, "", "a" * 64 + "/"],
)
def test_bad_sha_refused(tmp_path: Path, bad: str) -> None:
    store = BlobStore(tmp_path / "blobs")
    for op in (store.get, store.path, store.exists, store.delete, store.size):
        with pytest.raises(ValueError):
            op(bad)
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize("suffix", ["/x", "../x", ".png/..", "png", ". "])
def test_bad_suffix_refused(tmp_path: Path, suffix: str) -> None:
    with pytest.raises(ValueError):
        BlobStore(tmp_path).put(b"x", suffix)


def test_sweep_temp_removes_only_stale_temp_files(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    sha = store.put(b"kept")
    stale = tmp_path / sha[:2] / ".tmp-crashed.part"
    stale.write_bytes(b"half")
    os.utime(stale, (0, 0))
    fresh = tmp_path / sha[:2] / ".tmp-writing.part"
    fresh.write_bytes(b"in progress")
    assert store.sweep_temp(max_age_s=60) == 1
    assert not stale.exists() and fresh.exists() and store.exists(sha)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 64 KiB tmpfs: a disk that really fills up. Needs root; skipped otherwise."""
    mount_point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_disk_full_raises_blob_error_and_leaves_nothing(tiny_tmpfs: Path) -> None:
    store = BlobStore(tiny_tmpfs / "blobs")
    small = store.put(b"fits")
    with pytest.raises(BlobError, match=r"the disk is full \(.*blobs\)"):
        store.put(os.urandom(256 * 1024), ".png")
    assert _files(tiny_tmpfs) == [store.path(small)]
    assert store.get(small) == b"fits"


def test_file_size_limit_raises_blob_error(tmp_path: Path) -> None:
    # RLIMIT_FSIZE makes write() fail with EFBIG for real; it must run in a child
    # process because the limit cannot be raised again once lowered.
    script = textwrap.dedent(
        f"""
        import os, resource, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from pipeline.contract.blobs import BlobError, BlobStore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        store = BlobStore({str(tmp_path)!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            store.put(os.urandom(64 * 1024), ".png")
        except BlobError as exc:
            print("BlobError:", exc)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("BlobError: could not save the image"), proc.stdout
    assert _files(tmp_path) == []
