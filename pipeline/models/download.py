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

A model can load from more than one repository (`hub_parts`): a dedicated inpainting model
given as a Hub id (`inpaint_source`), and the base a single-file checkpoint takes the rest
from (`single_file_config`: every component's configuration, and the weights of only the
components the file lacks — for a flow family's transformer file, its text encoders and
VAE; for an SD/SDXL checkpoint, mostly none). All of them are one download: one disk
check for their sum, one progress count.
"""

from __future__ import annotations

import dataclasses
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


class DownloadStopped(Exception):  # noqa: N818 - not an error: nobody waits for the model
    """Raised between two chunks when `should_stop` says nobody waits for this model any
    more (every job that asked for it was cancelled): the files complete so far stay in
    the cache, the one in progress is dropped."""


@dataclass(frozen=True)
class HubPart:
    """One Hub repository a configured model loads from, and what of it is fetched."""

    key: str  # the [models.NAME] key naming it: source, inpaint_source, single_file_config
    repo: str
    family: str  # the family's config name ("auto": read from its model_index.json)
    # Components whose weights a single file brings: of these only the configs.
    configs_only: frozenset[str] = frozenset()
    variants: bool = True  # False: plain weights (the parts a UNet single file lacks)


def hub_parts(model: ModelConfig) -> list[HubPart]:
    """The Hub repositories `model` loads from: its source; for a single-file source, the
    base its other parts and every configuration come from (`single_file_config`); its
    dedicated inpainting model (`inpaint_source`)."""
    from pipeline.contract.families import SINGLE_FILE_SUFFIXES, detect_family
    from pipeline.contract.hub_files import is_hub_id
    from pipeline.families import family as family_of

    parts = []
    source = Path(model.source)
    if is_hub_id(model.source):
        parts.append(HubPart("source", model.source, model.family))
    elif (
        is_hub_id(model.single_file_config)
        and source.suffix in SINGLE_FILE_SUFFIXES
        and source.is_file()
    ):
        family = model.family if model.family != "auto" else detect_family(model.source)
        held, variants = family_of(family).for_source(model.source).single_file_parts(source)
        parts.append(
            HubPart("single_file_config", model.single_file_config, family, held, variants)
        )
    if is_hub_id(model.inpaint_source):
        parts.append(HubPart("inpaint_source", model.inpaint_source, model.family))
    return parts


@dataclass(frozen=True)
class Fetched:
    model: ModelConfig  # as configured, each Hub id replaced by its snapshot folder
    variants: dict[str, str]  # key (source, inpaint_source…) → the weights variant fetched
    fetched: int  # bytes downloaded now (0: everything was in the cache)


@dataclass
class _Planned:
    part: HubPart
    commit: str
    folder: Path  # its snapshot folder
    variant: str
    missing: list[Any]  # huggingface_hub's DryRunFileInfo of the files not in the cache


def fetch_model(
    model: ModelConfig,
    *,
    half: bool,
    on_progress: OnProgress | None = None,
    on_disk: OnDisk | None = None,
    should_stop: Callable[[], bool] | None = None,
    cache_dir: str | None = None,
) -> Fetched:
    """Download what `model` needs of the Hub (`hub_parts`) into the Hugging Face cache,
    with one disk check for all of it. Raises ModelError in one line: Hub unreachable, no
    such repository, not enough disk; DownloadStopped when `should_stop()` turns true.
    `on_disk` is told (bytes needed, bytes free, the cache folder) once the disk is
    checked."""
    planned = [_plan(part, half, cache_dir) for part in hub_parts(model)]
    needed = sum(f.file_size or 0 for p in planned for f in p.missing)
    if planned:
        _check_disk(model.name, needed, planned[0].folder, on_disk)
    done, began = 0, time.monotonic()
    for plan in planned:
        done = _fetch(plan, done, needed, began, on_progress, should_stop, cache_dir)
    fields = {p.part.key: str(p.folder) for p in planned}
    variants = {p.part.key: p.variant for p in planned}
    return Fetched(dataclasses.replace(model, **fields), variants, needed)


def _plan(part: HubPart, half: bool, cache_dir: str | None) -> _Planned:
    """What of `part`'s repository is needed and not in the cache yet (nothing fetched
    but its model_index.json)."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    try:
        api = HfApi()
        commit = api.model_info(part.repo).sha
        sizes = {
            f.path: f.size
            for f in api.list_repo_tree(part.repo, recursive=True, revision=commit)
            if isinstance(f, RepoFile)
        }
        if INDEX not in sizes:
            raise ModelError(
                f"model {part.repo!r} has no {INDEX}: it is not a diffusers repository"
            )
        index_path = hf_hub_download(part.repo, INDEX, revision=commit, cache_dir=cache_dir)
        index = json.loads(Path(index_path).read_text())
        selection = _selection(part, index, sizes, half and part.variants)
        dry_run = snapshot_download(
            part.repo,
            revision=commit,
            allow_patterns=list(selection.files),
            cache_dir=cache_dir,
            dry_run=True,
        )
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many kinds; one line
        raise _one_line(part.repo, exc) from None
    # In path order (the dry run answers in whatever order its threads finish).
    missing = sorted((f for f in dry_run if f.will_download), key=lambda f: f.filename)
    return _Planned(part, commit, Path(index_path).parent, selection.variant, missing)


def _fetch(
    plan: _Planned,
    done: int,
    total: int,
    began: float,
    on_progress: OnProgress | None,
    should_stop: Callable[[], bool] | None,
    cache_dir: str | None,
) -> int:
    """Each missing file of one repository; returns the bytes fetched so far in all."""
    from huggingface_hub import hf_hub_download

    for info in plan.missing:
        if should_stop is not None and should_stop():
            raise DownloadStopped(plan.part.repo)
        bar = functools.partial(
            _FileBar, on_progress, should_stop, info.filename, done, total, began
        )
        try:
            hf_hub_download(
                plan.part.repo,
                info.filename,
                revision=plan.commit,
                cache_dir=cache_dir,
                tqdm_class=bar,
            )
        except DownloadStopped:
            raise
        except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many kinds
            raise _one_line(plan.part.repo, exc) from None
        done += info.file_size or 0
    return done


def _one_line(repo: str, exc: BaseException) -> ModelError:
    if isinstance(exc, ModelError):
        return exc
    error = hub_error(repo, exc)  # type: ignore[arg-type]
    return HubUnreachable(str(error)) if _unreachable(exc) else error


def _selection(part: HubPart, index: dict, sizes: dict[str, int], half: bool) -> Selection:
    """The files of the repository this model loads: of the components its family loads
    (of those a single file brings, their configs only)."""
    from pipeline.families import family as family_of

    name = part.family if part.family != "auto" else family_from_index(index)
    options = family_of(name).load_options()
    skip = [component for component, value in options.items() if value is None]
    return select_files(sizes, index, half=half, skip=skip, configs_only=part.configs_only)


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
        should_stop: Callable[[], bool] | None,
        file: str,
        before: int,
        whole: int,
        began: float,
        **kwargs: Any,  # tqdm's: total (this file's bytes), initial, desc, unit…
    ) -> None:
        self.on_progress = on_progress
        self.should_stop = should_stop
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
        if self.should_stop is not None and self.should_stop():
            raise DownloadStopped(self.file)
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
