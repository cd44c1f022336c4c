"""Content-addressed file store: every image, mask and LoRA file is named by its sha256.

Shared by the bot (saves attachments, posts results) and the workers (read
inputs, write outputs), so it imports nothing heavier than the standard library.

Layout: ``root/ab/abcdef…[.suffix]`` — two hex characters of sharding keep any
one directory small. A blob is written to a temp file in its final directory,
fsynced, then renamed into place, so readers never see half a file and a crash
leaves at most a ``.tmp-*`` file that :meth:`BlobStore.sweep_temp` removes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

_SHA = re.compile(r"[0-9a-f]{64}")
# A suffix is cosmetic (lets tools open the file); keep it to a plain extension.
_SUFFIX = re.compile(r"(\.[A-Za-z0-9]{1,12})?")
_TEMP_PREFIX = ".tmp-"
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class BlobError(Exception):
    """A blob could not be stored or read; the message can be shown to the user."""


class BlobNotFound(BlobError):
    """No blob with that sha256 is stored."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_sha(value: object) -> bool:
    """True for a lowercase 64-hex string, the only form of blob reference."""
    return isinstance(value, str) and _SHA.fullmatch(value) is not None


class BlobStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"BlobStore({str(self.root)!r})"

    def put(self, data: bytes, suffix: str = "") -> str:
        """Store ``data`` and return its sha256; storing the same bytes again is a no-op."""
        if _SUFFIX.fullmatch(suffix) is None:
            raise ValueError(f"blob suffix must look like '.png' but is {suffix!r}")
        sha = sha256_hex(data)
        if self._find(sha) is not None:
            return sha
        shard = self._shard(sha)
        try:
            shard.mkdir(parents=True, exist_ok=True)
            self._write_atomic(shard / f"{sha}{suffix}", data)
        except OSError as exc:
            raise _save_error(exc, self.root) from exc
        return sha

    def get(self, sha: str) -> bytes:
        return self.path(sha).read_bytes()

    def path(self, sha: str) -> Path:
        """Where the blob is stored; raises BlobNotFound when it is not."""
        found = self._find(sha)
        if found is None:
            raise BlobNotFound(f"the file {sha[:12]}… is no longer stored")
        return found

    def exists(self, sha: str) -> bool:
        return self._find(sha) is not None

    def size(self, sha: str) -> int:
        return self.path(sha).stat().st_size

    def delete(self, sha: str) -> bool:
        """Remove the blob (every suffix it was stored under); False when it was absent."""
        removed = False
        for path in self._candidates(sha):
            try:
                path.unlink()
                removed = True
            except FileNotFoundError:
                pass  # deleted concurrently: the outcome is the same
        return removed

    def sweep_temp(self, max_age_s: float = 3600.0) -> int:
        """Delete temp files a crashed writer left behind; returns how many went."""
        cutoff = time.time() - max_age_s
        removed = 0
        for path in self.root.glob(f"*/{_TEMP_PREFIX}*"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    # -- internals -------------------------------------------------------------

    def _shard(self, sha: str) -> Path:
        # Validating here means no caller-supplied string ever becomes a path
        # component unchecked: '../x' or 'ab/../../etc' are refused.
        if not is_sha(sha):
            raise ValueError(f"not a blob id (64 lowercase hex characters): {sha!r}")
        return self.root / sha[:2]

    def _candidates(self, sha: str) -> list[Path]:
        shard = self._shard(sha)
        try:
            names = os.listdir(shard)
        except FileNotFoundError:
            return []
        return [shard / n for n in names if n == sha or n.startswith(f"{sha}.")]

    def _find(self, sha: str) -> Path | None:
        bare = self._shard(sha) / sha
        if bare.is_file():  # the common case needs one stat, not a listdir
            return bare
        found = self._candidates(sha)
        return found[0] if found else None

    @staticmethod
    def _write_atomic(final: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=_TEMP_PREFIX, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        _fsync_dir(final.parent)


def _save_error(exc: OSError, root: Path) -> BlobError:
    if exc.errno in _DISK_FULL:
        return BlobError(f"could not save the image: the disk is full ({root})")
    if exc.errno == errno.EFBIG:
        return BlobError(f"could not save the image: it is larger than the system allows ({root})")
    return BlobError(f"could not save the image: {exc.strerror or exc} ({root})")


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some filesystems cannot open directories; the data itself is synced
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
