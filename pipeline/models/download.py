"""Fetch a configured Hub model's files before it is loaded, with progress.

`sdbot doctor --download` and the worker's first load of a Hub id call `fetch_model`: it
asks the Hub (huggingface_hub, `HF_ENDPOINT` and `HF_TOKEN` as usual) for the repository's
file list, picks the files this model needs (`pipeline.contract.hub_files.select_files`:
one set of weights, of the components the family loads), lets `snapshot_download`'s dry run
say which of them are not in the cache yet and their sizes, checks the disk holds them
(one line if not), then fetches them one by one with `hf_hub_download`, reporting each
file's bytes, speed and the whole download's progress. Files already complete in the cache
are never fetched again, so a download stopped half way resumes with the files it lacked;
within a file, a dropped connection resumes with an HTTP Range request (huggingface_hub's
`http_get`). The model then loads from the snapshot folder, so diffusers downloads nothing
of its own.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.contract.config import ModelConfig
from pipeline.contract.families import ModelError, family_from_index, hub_error
from pipeline.contract.hub_files import INDEX, Selection, disk_problem, select_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownloadProgress:
    """One moment of a download: the file being fetched and the whole download."""

    file: str
    file_done: int
    file_bytes: int
    done: int  # bytes of every file fetched so far
    total: int  # bytes to fetch in all (files already cached not counted)
    bytes_per_s: float  # this file's speed so far
    elapsed_s: float  # since the download began
    finished: bool = False  # this file is complete

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the whole download's pace so far."""
        if self.done <= 0 or self.elapsed_s <= 0:
            return None
        return (self.total - self.done) * self.elapsed_s / self.done


OnProgress = Callable[[DownloadProgress], None]
OnDisk = Callable[[int, int, str], None]


class HubUnreachable(ModelError):
    """The Hub could not be reached (no network, HF_HUB_OFFLINE): the worker then loads
    from the cache as before, which says in one line if the model is not there."""


def _unreachable(exc: BaseException) -> bool:
    names = [type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None]
    words = ("Connect", "Offline", "Timeout", "Network", "LocalEntryNotFound")
    return any(word in name for name in names for word in words)


@dataclass(frozen=True)
class Fetched:
    folder: str  # the snapshot folder: what from_pretrained loads
    variant: str  # the weights variant fetched ("" or "fp16")
    fetched: int  # bytes downloaded now (0: everything was in the cache)


def fetch_model(
    model: ModelConfig,
    *,
    half: bool,
    on_progress: OnProgress | None = None,
    on_disk: OnDisk | None = None,
    cache_dir: str | None = None,
) -> Fetched:
    """Download what `model` (a Hub id) needs into the Hugging Face cache. Raises ModelError
    in one line: Hub unreachable, no such repository, not enough disk. `on_disk` is told
    (bytes needed, bytes free, the cache folder) once the disk is checked."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    source = model.source
    try:
        api = HfApi()
        commit = api.model_info(source).sha
        sizes = {
            f.path: f.size
            for f in api.list_repo_tree(source, recursive=True, revision=commit)
            if isinstance(f, RepoFile)
        }
        if INDEX not in sizes:
            raise ModelError(f"model {source!r} has no {INDEX}: it is not a diffusers repository")
        index_path = hf_hub_download(source, INDEX, revision=commit, cache_dir=cache_dir)
        selection = _selection(model, json.loads(Path(index_path).read_text()), sizes, half)
        plan = snapshot_download(
            source,
            revision=commit,
            allow_patterns=list(selection.files),
            cache_dir=cache_dir,
            dry_run=True,
        )
        # In path order (the dry run answers in whatever order its threads finish).
        missing = sorted((f for f in plan if f.will_download), key=lambda f: f.filename)
        _check_disk(model.name, sum(f.file_size or 0 for f in missing), Path(index_path), on_disk)
        done, total, began = 0, sum(f.file_size or 0 for f in missing), time.monotonic()
        for info in missing:
            bar = functools.partial(_FileBar, on_progress, info.filename, done, total, began)
            hf_hub_download(
                source, info.filename, revision=commit, cache_dir=cache_dir, tqdm_class=bar
            )
            done += info.file_size or 0
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many kinds; one line
        error = hub_error(source, exc)
        if _unreachable(exc):
            raise HubUnreachable(str(error)) from None
        raise error from None
    return Fetched(str(Path(index_path).parent), selection.variant, total)


def _selection(model: ModelConfig, index: dict, sizes: dict[str, int], half: bool) -> Selection:
    """The files of the repository this model loads: of the components its family loads."""
    from pipeline.families import family as family_of

    name = model.family if model.family != "auto" else family_from_index(index)
    options = family_of(name).load_options()
    skip = [component for component, value in options.items() if value is None]
    return select_files(sizes, index, half=half, skip=skip)


def _check_disk(model: str, needed: int, inside: Path, on_disk: OnDisk | None) -> None:
    """ModelError in one line when the cache's disk cannot hold `needed` bytes more."""
    where = next((p for p in (inside, *inside.parents) if p.exists()), Path("/"))
    cache = where
    while cache.parent != cache and not cache.name.startswith("models--"):
        cache = cache.parent
    shown = str(cache.parent if cache.name.startswith("models--") else where)
    free = shutil.disk_usage(where).free
    problem = disk_problem(model, needed, free, shown)
    if problem:
        raise ModelError(problem)
    if on_disk is not None:
        on_disk(needed, free, shown)


class _FileBar:
    """What `hf_hub_download` takes as its `tqdm_class`: told each chunk of one file."""

    def __init__(
        self,
        on_progress: OnProgress | None,
        file: str,
        before: int,
        whole: int,
        began: float,
        **kwargs: Any,  # tqdm's: total (this file's bytes), initial, desc, unit…
    ) -> None:
        self.on_progress = on_progress
        self.file = file
        self.before = before
        self.whole = whole
        self.began = began
        self.file_bytes = int(kwargs.get("total") or 0)
        self.n = int(kwargs.get("initial") or 0)
        self.started = time.monotonic()
        self.closed = False

    def __enter__(self) -> _FileBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float | None = 1) -> None:
        self.n += int(n or 0)
        self._report(finished=False)

    def close(self) -> None:
        if not self.closed and self.n >= self.file_bytes:
            self.closed = True
            self._report(finished=True)

    def _report(self, *, finished: bool) -> None:
        if self.on_progress is None:
            return
        now = time.monotonic()
        self.on_progress(
            DownloadProgress(
                self.file,
                self.n,
                self.file_bytes,
                self.before + self.n,
                self.whole,
                self.n / max(now - self.started, 1e-6),
                now - self.began,
                finished,
            )
        )


def file_line(progress: DownloadProgress) -> str:
    """One file's line: "unet/diffusion_pytorch_model.fp16.safetensors 1.6 GB at
    84 MB/s; 3.2 of 5.1 GB, about 25 s left"."""
    from pipeline.contract.hub_files import progress_line
    from pipeline.contract.memory_plan import size_text

    eta = progress.eta_s
    left = f", about {eta:.0f} s left" if eta is not None and progress.done < progress.total else ""
    whole = progress_line(progress.done, progress.total).removeprefix("downloading the model, ")
    return (
        f"{progress.file} {size_text(progress.file_bytes)} at "
        f"{size_text(progress.bytes_per_s)}/s; {whole}{left}"
    )


def log_progress(model: str, then: OnProgress | None = None) -> OnProgress:
    """A progress callback that logs a line per file fetched, then passes it on."""

    def report(progress: DownloadProgress) -> None:
        if progress.finished:
            log.info("model %s: downloaded %s", model, file_line(progress))
        if then is not None:
            then(progress)

    return report
