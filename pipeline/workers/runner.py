"""One worker's job loop: load models once, run a batch, report what happened as events.

The Runner is the same object inside a LocalPool process and inside a Ray actor; the
pool only moves batches in and events out. It never raises out of `run`: every
failure becomes a `Failed` event for the jobs it touched, and the worker keeps
serving (a worker that dies instead is the pool's problem, see `pipeline.workers.local_pool`).

Which errors a member may read: exceptions whose class is defined in this package
(`pipeline.*`) and derives from ValueError (JobError, ImageInputError, NoFaceFound,
ConfigError, …), plus ModelError, LoraError and BlobError, were written with a
user-safe message. Anything else (a ValueError from inside diffusers included) may
carry internals, so the member gets a generic line and the traceback goes to the log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pipeline.contract.blobs import BlobError, BlobStore
from pipeline.contract.config import Config
from pipeline.contract.jobs import (
    Cancelled,
    Done,
    Event,
    Failed,
    GenerateSpec,
    JobSpec,
    OutputImage,
    Paused,
    Progress,
    Started,
    TrainSpec,
)
from pipeline.contract.pool import ModelMemory

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]
Batch = Sequence[tuple[str, JobSpec]]
PROGRESS_INTERVAL_S = 0.25  # at most ~4 progress events per second per batch
DOWNLOAD_INTERVAL_S = 1.0  # a model download's progress: at most one event a second
# Exception class names (from modules we may not import here) whose messages are
# written for members.
USER_SAFE_NAMES = frozenset({"ModelError", "LoraError"})
DEVICE_FAULT = "the GPU reported an error; its worker restarts and the job is retried"


class Runner:
    """Runs job batches on one device, loading each model once."""

    def __init__(self, config: Config, *, device: str, blobs: BlobStore, name: str) -> None:
        self.config = config
        self.device = device
        self.blobs = blobs
        self.name = name
        self._models: Any = None  # pipeline.models.loading.ModelCache, built on first use
        self._loras: dict[str, Any] = {}  # model name → LoRA cache
        self._control: Any = None  # pipeline.control.apply.ControlCache, on first use
        self._peaks: dict[str, int] = {}  # model name → peak bytes measured over its jobs
        # Set after a CUDA device-side error: the CUDA context is unusable, so the worker
        # process must end (its pool starts a fresh one) instead of failing every job.
        self.broken = ""

    def warm_up(self) -> None:
        """Load the default model now, so the first job does not pay for it."""
        from pipeline.models.loading import prepare_device
        from pipeline.workers.quiet import quiet_libraries

        quiet_libraries()
        # Before any model: a device this machine lacks is a DeviceError (fatal for the
        # worker), and cuda:N becomes the current device of this process.
        self.device = prepare_device(self.device)
        threads = self.config.workers.cpu_threads
        if threads and not self.device.startswith("cuda"):
            import torch

            # Several CPU workers (or a worker beside the bot) oversubscribe the cores
            # with torch's default thread count; a small model then runs many times slower.
            torch.set_num_threads(threads)
        model = self._model("default")
        if self.config.workers.compile:
            from pipeline.generate import compiled

            loras, workers = self.config.loras, self.config.workers
            # One UNet row per image, two with CFG: the largest call a batch makes.
            rows = 2 * workers.batch_size * self.config.limits.max_count
            compiled.warm(
                model, self.config.defaults, slots=loras.slots, max_rank=loras.max_rank, rows=rows
            )

    def held(self) -> dict[str, list[str]]:
        """The models loaded here (least recently used first), each with the LoRA adapters
        loaded beside it: what the pool's model affinity reads."""
        models = [model.name for model in self._models.loaded()] if self._models else []
        return {name: self._loras[name].loaded() if name in self._loras else [] for name in models}

    def report(self) -> dict[str, Any]:
        """What the pool keeps of this worker after each batch: `held` and `memory`."""
        return {"held": self.held(), "memory": self.memory()}

    def memory(self) -> dict[str, ModelMemory]:
        """Each loaded model's memory plan, the plan's estimated peak and the peak measured
        over its jobs (for /admin stats and /metrics)."""
        from pipeline.models.memory import peak_measure

        measure = peak_measure(self.device)
        loaded = self._models.loaded() if self._models else []
        return {
            model.name: ModelMemory(
                plan=model.plan.mode if model.plan is not None else "",
                estimated_bytes=model.plan.peak if model.plan is not None else 0,
                peak_bytes=self._peaks.get(model.name, 0),
                measure=measure,
            )
            for model in loaded
        }

    def run(
        self,
        batch: Batch,
        emit: Emit,
        is_cancelled: Callable[[str], bool],
        should_yield: Callable[[], bool] = lambda: False,
        *,
        keeps_download: Callable[[str], bool] = lambda job_id: False,
    ) -> None:
        """Run every job of the batch; each gets Started, then exactly one terminal event.
        A download of the batch's model stops once every job of it is cancelled, unless
        `keeps_download` says of one that another job waits for that model."""

        def stop_download(ids: list[str]) -> Callable[[], bool]:
            return lambda: (
                all(is_cancelled(i) for i in ids) and not any(keeps_download(i) for i in ids)
            )

        for group in _groups(batch, self.config.workers.max_batch_pixels):
            if self.broken:
                for job_id, _ in group:
                    emit(Failed(job_id, DEVICE_FAULT, retryable=True))
                continue
            live = [(job_id, spec) for job_id, spec in group if not is_cancelled(job_id)]
            for job_id, _ in group:
                if is_cancelled(job_id):
                    emit(Cancelled(job_id))
            if not live:
                continue
            for job_id, _ in live:
                emit(Started(job_id, worker=self.name))
            with self._measured(live[0][1].model):
                stop = stop_download([job_id for job_id, _ in live])
                if isinstance(live[0][1], TrainSpec):
                    self._train(live[0][0], live[0][1], emit, is_cancelled, should_yield, stop)
                else:
                    self._generate(live, emit, is_cancelled, stop)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def _measured(self, model: str) -> Iterator[None]:
        """Measure the peak memory of one call (its model's load included) and keep the
        largest per model; a model unloaded since loses its figure."""
        from pipeline.models.memory import read_peak, reset_peak

        reset_peak(self.device)
        try:
            yield
        finally:
            try:
                name = self.config.model(model).name
            except ValueError:
                name = ""  # an unknown model: the job said so
            held = self.held()
            self._peaks = {n: p for n, p in self._peaks.items() if n in held}
            if name in held:
                self._peaks[name] = max(self._peaks.get(name, 0), read_peak(self.device))

    # -- generation ---------------------------------------------------------------------

    def _generate(
        self,
        jobs: list[tuple[str, GenerateSpec]],
        emit: Emit,
        is_cancelled: Callable[[str], bool],
        stop_download: Callable[[], bool] | None = None,
    ) -> None:
        from pipeline.generate.modes import GenerationCancelled, run_generation
        from pipeline.models.download import DownloadStopped

        ids = [job_id for job_id, _ in jobs]
        progress = _ProgressThrottle(ids, emit)
        failed_batch = ""
        results: list | None = None
        try:
            model = self._model(jobs[0][1].model, progress.download, stop_download)
            results = run_generation(
                model,
                [spec for _, spec in jobs],
                blobs=self.blobs,
                loras=self._lora_cache(model),
                control=self._control_cache(jobs),
                on_step=progress.step,
                # A batch stops only when all its members cancelled; a single member's
                # cancel discards its images at the end instead.
                should_cancel=lambda: all(is_cancelled(job_id) for job_id in ids),
                preview_every=self.config.workers.preview_every,
                edit=self.config.edit,
            )
        except (GenerationCancelled, DownloadStopped):
            for job_id in ids:
                emit(Cancelled(job_id))
            return
        except Exception as exc:  # noqa: BLE001 - every failure must become an event
            if is_device_fault(exc):
                self._device_fault(jobs, exc, emit)
            elif len(jobs) == 1:
                emit(failure_event(jobs[0][0], jobs[0][1], exc, self.device))
            else:
                failed_batch = type(exc).__name__
            # The traceback's frames hold the failed call's activations: let them go
            # before memory is freed and before anything runs again (which happens
            # below, outside this handler, once the exception itself is gone).
            traceback.clear_frames(exc.__traceback__)
            results = None
        if results is None:
            _free_memory(self.device)
            if failed_batch:
                self._one_by_one(jobs, failed_batch, emit, is_cancelled)
            return
        for (job_id, _), images in zip(jobs, results):
            if is_cancelled(job_id):
                emit(Cancelled(job_id))
            else:
                emit(Done(job_id, tuple(self._checked_images(images)), info=self._device_info()))

    def _checked_images(self, images: list[OutputImage]) -> list[OutputImage]:
        """Each image with its NSFW labels and scores (`[safety] detect`)."""
        if not self.config.safety.detect:
            return images
        from pipeline.safety.detector import detect_png

        return [dataclasses.replace(image, nsfw=detect_png(image.png)) for image in images]

    def _device_info(self) -> dict[str, Any]:
        """GPU memory the worker holds (for /metrics); nothing on a CPU worker."""
        if not self.device.startswith("cuda"):
            return {}
        import torch

        return {"worker": self.name, "gpu_memory_bytes": int(torch.cuda.memory_reserved())}

    def _one_by_one(
        self,
        jobs: list[tuple[str, GenerateSpec]],
        error: str,
        emit: Emit,
        is_cancelled: Callable[[str], bool],
    ) -> None:
        """One bad member (a broken LoRA, too big for memory together) must not sink the
        others: run each alone to find out which one fails."""
        log.info("batch of %d failed (%s); running its jobs one by one", len(jobs), error)
        for job in jobs:
            if self.broken:
                emit(Failed(job[0], DEVICE_FAULT, retryable=True))
            else:
                self._generate([job], emit, is_cancelled)

    def _device_fault(
        self, jobs: Sequence[tuple[str, JobSpec]], exc: Exception, emit: Emit
    ) -> None:
        log.error("device error on %s; this worker will restart", self.device, exc_info=exc)
        self.broken = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        for job_id, _ in jobs:
            emit(Failed(job_id, DEVICE_FAULT, retryable=True))

    # -- training -----------------------------------------------------------------------

    def _train(
        self,
        job_id: str,
        spec: TrainSpec,
        emit: Emit,
        is_cancelled: Callable[[str], bool],
        should_yield: Callable[[], bool],
        stop_download: Callable[[], bool] | None = None,
    ) -> None:
        from pipeline.models.download import DownloadStopped
        from pipeline.training.job import discard_checkpoints
        from pipeline.training.loop import TrainingCancelled

        try:
            # The run itself sees only this job: its progress and its own cancel check.
            event = self._train_once(
                job_id,
                spec,
                _ProgressThrottle([job_id], emit),
                lambda: is_cancelled(job_id),
                should_yield,
                stop_download,
            )
        except (TrainingCancelled, DownloadStopped):
            event = Cancelled(job_id)
        except Exception as exc:  # noqa: BLE001 - every failure must become an event
            if is_device_fault(exc):
                self._device_fault([(job_id, spec)], exc, lambda e: None)
                event = Failed(job_id, DEVICE_FAULT, retryable=True)
            else:
                event = failure_event(job_id, spec, exc, self.device)
            traceback.clear_frames(exc.__traceback__)
            del exc
            _free_memory(self.device)
        if not isinstance(event, Paused):
            discard_checkpoints(self.config, job_id)  # a worker that dies keeps it, to resume
        emit(event)

    def _train_once(
        self,
        job_id: str,
        spec: TrainSpec,
        progress: _ProgressThrottle,
        should_cancel: Callable[[], bool],
        should_yield: Callable[[], bool],
        stop_download: Callable[[], bool] | None = None,
    ) -> Event:
        from pipeline.contract.images import open_image
        from pipeline.training.job import run_training
        from pipeline.training.loop import TrainingPaused, TrainPhotos

        def decode(shas: Sequence[str]) -> list[Any]:
            limit = self.config.limits.max_input_pixels
            return [open_image(self.blobs.get(sha), max_pixels=limit, name="photo") for sha in shas]

        def on_progress(step: int, total: int, loss: float | None = None) -> None:
            progress.step(step, total, None, loss)

        model = self._model(spec.model, progress.download, stop_download)
        outcome = run_training(
            model,
            spec,
            TrainPhotos(decode(spec.photos), list(spec.captions), decode(spec.test_photos)),
            config=self.config,
            job_id=job_id,
            on_progress=on_progress,
            should_cancel=should_cancel,
            should_yield=should_yield,
        )
        if isinstance(outcome, TrainingPaused):
            return Paused(job_id, step=outcome.step)
        done = _training_done(job_id, spec, outcome)
        # The sample grid is posted like any result: the server's NSFW policy applies.
        return dataclasses.replace(done, images=tuple(self._checked_images(list(done.images))))

    # -- models -------------------------------------------------------------------------

    def _model(
        self,
        name: str,
        on_download: Callable[[Any], None] | None = None,
        stop_download: Callable[[], bool] | None = None,
    ) -> Any:
        if self._models is None:
            from pipeline.models.loading import ModelCache

            self._models = ModelCache(self.config, self.device, on_evict=self._forget_model)
        return self._models.get(name, on_download, stop_download)

    def _control_cache(self, jobs: list[tuple[str, GenerateSpec]]) -> Any:
        """ControlNets and IP-Adapters, loaded when a job first asks for one."""
        if self._control is None and any(s.control or s.reference for _, s in jobs):
            from pipeline.control.apply import ControlCache

            self._control = ControlCache(self.config)
        return self._control

    def _forget_model(self, name: str) -> None:
        self._loras.pop(name, None)  # its adapters live in the evicted pipeline

    def _lora_cache(self, model: Any) -> Any:
        """The worker's LoRA adapters for this model (its derived img2img/inpaint
        pipelines share the same modules, so one cache serves them all)."""
        if model.name not in self._loras:
            from pipeline.loras.adapters import LoraCache

            self._loras[model.name] = LoraCache(
                model.pipe,
                max_bytes=self.config.loras.cache_mb * 1024 * 1024,
                max_file_bytes=self.config.loras.max_file_mb * 1024 * 1024,
            )
        return self._loras[model.name]


# -- events -------------------------------------------------------------------------------


class _ProgressThrottle:
    """Turns the per-step callback into a few Progress events per second: a tiny model
    steps in milliseconds and a Discord message can be edited about once a second."""

    def __init__(self, job_ids: list[str], emit: Emit, interval_s: float = PROGRESS_INTERVAL_S):
        self.job_ids = job_ids
        self.emit = emit
        self.interval_s = interval_s
        self._last = 0.0

    def step(self, step: int, total: int, preview: bytes | None, loss: float | None = None) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s and step != total:
            return
        self._last = now
        for job_id in self.job_ids:
            self.emit(Progress(job_id, step, total, preview=preview, loss=loss))

    def download(self, progress: Any) -> None:
        """A model download's progress (pipeline.models.download.DownloadProgress), as a
        Progress event whose message the member reads: "downloading the model, 3.2 of
        23.8 GB"; at most one a second, and each file's end."""
        from pipeline.contract.hub_files import progress_line

        now = time.monotonic()
        if now - self._last < DOWNLOAD_INTERVAL_S and not progress.finished:
            return
        self._last = now
        message = progress_line(progress.done, progress.total)
        for job_id in self.job_ids:
            self.emit(Progress(job_id, 0, 0, message=message))


def _training_done(job_id: str, spec: TrainSpec, result: Any) -> Done:
    """TrainResult → Done: the kohya .safetensors file, sample images, validation figures."""
    from pipeline.contract.infotext import png_bytes
    from pipeline.training.job import training_info

    samples = tuple(
        OutputImage(png=png_bytes(image, ""), seed=spec.seed) for image in result.samples
    )
    files = ((f"{spec.name}.safetensors", result.safetensors),)
    return Done(job_id, images=samples, files=files, info=training_info(result))


def is_user_error(exc: BaseException) -> bool:
    """True when the exception's message was written to be shown to a member."""
    cls = type(exc)
    if isinstance(exc, BlobError) or cls.__name__ in USER_SAFE_NAMES:
        return True
    return isinstance(exc, ValueError) and cls.__module__.startswith("pipeline.")


def is_out_of_memory(exc: BaseException) -> bool:
    from pipeline.models.loading import is_out_of_memory as oom

    return oom(exc)


_DEVICE_FAULT_TEXT = (
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "cuda error",
    "cudnn_status",
    "cublas_status",
    "misaligned address",
)


def is_device_fault(exc: BaseException) -> bool:
    """A CUDA error after which the process's CUDA context is unusable (every later call
    fails the same way): only a new process recovers. Out of memory is not one."""
    if is_out_of_memory(exc):
        return False
    if type(exc).__name__ == "AcceleratorError":  # torch ≥ 2.8 raises this for CUDA errors
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(part in text for part in _DEVICE_FAULT_TEXT)


def failure_event(job_id: str, spec: JobSpec, exc: BaseException, device: str) -> Failed:
    """The Failed event for an exception, with a message a member may read. (The caller
    frees memory once the exception and its traceback are gone.)"""
    if is_user_error(exc):
        return Failed(job_id, str(exc) or type(exc).__name__, retryable=False)
    if is_out_of_memory(exc):
        where = "GPU" if device.startswith("cuda") else "worker"
        return Failed(
            job_id,
            f"the {where} ran out of memory at {_job_size(spec)}; try a smaller size or count",
            retryable=False,
        )
    log.error("job %s failed inside the model", job_id, exc_info=exc)
    return Failed(
        job_id,
        f"generation failed inside the model ({type(exc).__name__}); the job id is in the logs",
        retryable=False,
    )


def _job_size(spec: JobSpec) -> str:
    if isinstance(spec, GenerateSpec):
        return f"{spec.width}×{spec.height} ×{spec.count}"
    return f"{spec.resolution}×{spec.resolution} ×{spec.batch_size}"


def _free_memory(device: str) -> None:
    from pipeline.models.loading import free_device_memory

    free_device_memory(device)


def _groups(batch: Batch, max_pixels: int = 0) -> list[list[tuple[str, JobSpec]]]:
    """Jobs that can share one pipeline call: equal non-empty batch keys, at most
    `max_pixels` (jobs × images × width × height) per call; else alone."""
    groups: dict[str, list[tuple[str, JobSpec]]] = {}
    singles: list[list[tuple[str, JobSpec]]] = []
    for job_id, spec in batch:
        key = spec.batch_key()
        if key:
            groups.setdefault(key, []).append((job_id, spec))
        else:
            singles.append([(job_id, spec)])
    calls = [call for group in groups.values() for call in split_by_pixels(group, max_pixels)]
    return calls + singles


def call_pixels(spec: JobSpec) -> int:
    """The pixels one job puts through a pipeline call (all its images)."""
    if isinstance(spec, GenerateSpec):
        return spec.count * spec.width * spec.height
    return 0


def split_by_pixels(
    jobs: list[tuple[str, JobSpec]], max_pixels: int
) -> list[list[tuple[str, JobSpec]]]:
    """Consecutive runs of jobs whose pixels add up to at most max_pixels (0: no limit).
    A job larger than the budget on its own still runs, alone."""
    calls: list[list[tuple[str, JobSpec]]] = []
    used = 0
    for job in jobs:
        pixels = call_pixels(job[1])
        if not calls or (max_pixels and used + pixels > max_pixels):
            calls.append([])
            used = 0
        calls[-1].append(job)
        used += pixels
    return calls
