"""Personal models on the bot side: quotas and registering a trained LoRA.

Shared by `/train` (bot/cogs/train.py) and `sdbot train` (bot/cli/offline_train.py), so
the rules are the same wherever a model is trained. No torch here: the file arrives
as bytes from a worker (or from the offline trainer) and goes into the blob store.
"""

from __future__ import annotations

from typing import Any

import sqlite_utils

from bot import store
from pipeline.contract.blobs import BlobStore
from pipeline.contract.config import Config


class QuotaExceeded(store.StoreError):
    pass


def check_name_free(db: sqlite_utils.Database, user_id: str, name: str) -> None:
    """Refuse a name the member already uses — before training, not after."""
    for row in store.list_loras(db, str(user_id), None):
        if row["owner_id"] == str(user_id) and row["name"].lower() == name.lower():
            raise store.DuplicateName(
                f"you already have a LoRA named '{name}'; pick another name or /lora delete it"
            )


def check_quota(
    db: sqlite_utils.Database, config: Config, user_id: str, new_bytes: int = 0
) -> None:
    """Refuse a new personal model over the member's count or size quota."""
    count, used = store.lora_usage(db, str(user_id))
    limits = config.training
    if count >= limits.max_loras_per_member:
        raise QuotaExceeded(
            f"you have {count} personal models (the limit is {limits.max_loras_per_member}); "
            "delete one with /lora delete first"
        )
    limit_bytes = limits.max_lora_mb_per_member * 2**20
    if used + new_bytes > limit_bytes:
        raise QuotaExceeded(
            f"your personal models use {used / 2**20:.0f} MB and this one needs "
            f"{new_bytes / 2**20:.0f} MB more (the limit is {limits.max_lora_mb_per_member} MB); "
            "delete one with /lora delete first"
        )


def register_trained_lora(
    db: sqlite_utils.Database,
    blobs: BlobStore,
    config: Config,
    *,
    owner_id: str,
    guild_id: str | None,
    name: str,
    token: str,
    method: str,
    base_model: str,
    sha256: str,
    metrics: dict[str, Any],
    job_id: str | None = None,
) -> dict:
    """Add a trained .safetensors, already in the blob store, to the member's registry."""
    size = blobs.size(sha256)
    check_quota(db, config, owner_id, size)
    return store.add_lora(
        db,
        owner_id=str(owner_id),
        guild_id=guild_id,
        name=name,
        token=token,
        method=method,
        base_model=base_model,
        sha256=sha256,
        path=str(blobs.path(sha256)),
        size_bytes=size,
        metrics=metrics,
        job_id=job_id,
    )


def validation_summary(metrics: dict[str, Any]) -> str:
    """The held-out figures in words, flagging a model that got worse."""
    base, adapted = metrics.get("base_loss"), metrics.get("adapter_loss")
    if base is None or adapted is None or base != base or adapted != adapted:
        return "No held-out photos, so no validation loss."
    change = (adapted - base) / base * 100 if base else 0.0
    line = f"Held-out loss: base {base:.4f} → yours {adapted:.4f} ({change:+.1f}%)."
    if metrics.get("got_worse"):
        line += (
            " ⚠️ Your model does worse than the base model on your held-out photos: "
            "try more or more varied photos, or fewer steps."
        )
    return line
