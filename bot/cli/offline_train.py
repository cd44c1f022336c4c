"""`sdbot train`: one personal model, trained in this process, registered in the database.

The same steps a `/train` job takes on a worker — prepare the photos, train, validate,
export in kohya format — without Discord or the queue. Torch is imported here, which
is fine: this is a command of its own, never the bot process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bot import store
from bot.services.personal import (
    check_name_free,
    check_quota,
    register_trained_lora,
    validation_summary,
)
from bot.services.training import (
    train_spec,
    training_family,
    training_metrics,
    training_resolution,
)
from pipeline.contract.blobs import BlobStore
from pipeline.contract.config import Config
from pipeline.contract.model_names import resolve_model


def _read_photos(paths: list[Path]) -> list[tuple[str, bytes]]:
    photos = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"photo {path} does not exist")
        photos.append((path.name, path.read_bytes()))
    return photos


def _progress(step: int, total: int, loss: float) -> None:
    width = 30
    filled = int(width * step / max(total, 1))
    bar = "#" * filled + "." * (width - filled)
    sys.stderr.write(f"\r[{bar}] step {step}/{total}  loss {loss:.4f}")
    if step >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def train_offline(args: argparse.Namespace, config: Config) -> int:
    from pipeline.contract.infotext import png_bytes
    from pipeline.models.loading import ModelCache
    from pipeline.training.dataset import dataset_summary, prepare_dataset, rare_token
    from pipeline.training.job import discard_checkpoints, run_training, training_info
    from pipeline.training.loop import TrainPhotos, TrainResult
    from pipeline.training.samples import make_grid

    db = store.open_db(config.storage.database)
    blobs = BlobStore(config.storage.blobs)
    check_name_free(db, args.user, args.name)
    check_quota(db, config, args.user)
    # 1. The photos
    zip_data = args.zip.read_bytes() if args.zip else None
    config, model_config = resolve_model(config, args.model)
    resolution = args.resolution or training_resolution(config, model_config)
    family = training_family(model_config)
    family.check_training(resolution)  # before loading it: a model that cannot train
    model = ModelCache(config, config.workers.devices[0]).get(model_config.name)
    dataset = prepare_dataset(
        _read_photos(args.photos),
        zip_data=zip_data,
        resolution=resolution,
        min_side=config.training.min_side,
        subject=args.subject,
        token=rare_token(args.name),
        max_photos=config.training.max_photos,
        min_photos=config.training.min_photos,
    )
    print(dataset_summary(dataset.report))
    # 2. Train
    spec = train_spec(
        config,
        name=args.name,
        photos=[f"{i:064x}" for i in range(len(dataset.train))],
        captions=[t.caption for t in dataset.train],
        token=dataset.token,
        subject=args.subject,
        model=model.name,
        method=args.method,
        steps=args.steps,
        resolution=resolution,
        family=family,
    )
    spec.check(config.limits)  # the command line's one check of the spec
    started = time.monotonic()
    job_id = f"cli-{args.user}-{args.name}"
    photos = TrainPhotos(
        [t.image for t in dataset.train], list(spec.captions), [t.image for t in dataset.test]
    )
    try:
        result = run_training(
            model, spec, photos, config=config, job_id=job_id, on_progress=_progress
        )
    finally:
        discard_checkpoints(config, job_id)  # never kept: no pause here
    assert isinstance(result, TrainResult)  # no should_yield: it never pauses
    # 3. Register and report
    metrics = training_metrics(training_info(result))
    record = register_trained_lora(
        db,
        blobs,
        config,
        owner_id=args.user,
        guild_id=None,
        name=args.name,
        token=dataset.token,
        method=args.method,
        base_model=model.name,
        sha256=blobs.put(result.safetensors, ".safetensors"),
        metrics=metrics,
    )
    grid = Path(f"{args.name}-samples.png")
    grid.write_bytes(png_bytes(make_grid(result.samples)))
    print(validation_summary(metrics))
    print(
        f"trained {args.method} '{args.name}' in {time.monotonic() - started:.0f}s, "
        f"{result.steps} steps; {len(result.safetensors) / 2**20:.1f} MB, "
        f"sha256 {record['sha256'][:12]}"
    )
    print(f"samples: {grid}")
    print(f"use it: <lora:{args.name}:0.8> — trigger word '{dataset.token}'")
    return 0
