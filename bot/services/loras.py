"""LoRAs for a job: `<lora:name:w>` tags resolved to what the member may use, and the
server library (`loras.dir`) registered for each guild."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import sqlite_utils

from bot import store
from bot.errors import UserError
from bot.services.database import DbThread, discord_id
from pipeline.contract.blobs import BlobStore, sha256_hex
from pipeline.contract.config import Config
from pipeline.contract.jobs import LoraRef
from pipeline.contract.prompt_syntax import extract_loras
from pipeline.contract.safetensors_check import safetensors_problem

log = logging.getLogger("sdbot")

LORA_TAG = ("<lora:", "<lyco:")
OPTION_WEIGHT = 0.8  # /imagine's lora option: the weight a tag would usually carry


class LoraResolver:
    """Turns the LoRA tags of a prompt into the LoraRefs a job carries."""

    def __init__(self, config: Config, db: DbThread) -> None:
        self.config = config
        self.db = db

    async def resolve(
        self, prompt: str, user_id: int, guild_id: int | None, option: str | None = None
    ) -> tuple[LoraRef, ...]:
        """The prompt's `<lora:name:w>` tags, then the `lora` option (at OPTION_WEIGHT),
        → LoraRefs the member may use (own, shared, server). The option travels in the
        spec as data: the prompt stays as the member typed it."""
        tags: list[tuple[str, float]] = []
        if any(tag in prompt.lower() for tag in LORA_TAG):
            tags = extract_loras(prompt, max_weight=self.config.limits.max_lora_weight)[1]
        if option and option.strip():
            tags.append((option.strip(), OPTION_WEIGHT))
        return await self.named(tags, user_id, guild_id)

    async def named(
        self, tags: Iterable[tuple[str, float]], user_id: int, guild_id: int | None
    ) -> tuple[LoraRef, ...]:
        """(name, weight) pairs → LoraRefs, as this member may use them: a button another
        member clicks re-resolves a job's LoRAs by name, so private ones stay private."""
        refs = []
        for name, weight in tags:
            row = await self.db.call(_find_lora_or_hint, name, str(user_id), discord_id(guild_id))
            refs.append(LoraRef(row["name"], row["sha256"], weight))
        return tuple(refs)


def _find_lora_or_hint(
    db: sqlite_utils.Database, name: str, user_id: str, guild_id: str | None
) -> dict:
    try:
        return store.find_lora(db, name, user_id=user_id, guild_id=guild_id)
    except store.LoraNotFound:
        from difflib import get_close_matches

        names = [row["name"] for row in store.list_loras(db, user_id, guild_id)]
        close = get_close_matches(name, names, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else " /lora list shows yours."
        raise UserError(f"LoRA '{name}' not found.{hint}") from None


# -- the server LoRA library ---------------------------------------------------------------


def register_server_loras(
    db: sqlite_utils.Database, blobs: BlobStore, config: Config, guild_ids: set[int]
) -> int:
    """Put each `*.safetensors` in `loras.dir` into the blob store (workers find LoRAs by
    sha256) and register it as each guild's library LoRA, named after the file.
    Files already registered (same sha) are skipped; returns how many were added."""
    folder = Path(config.lora_dir)
    if not folder.is_dir() or not guild_ids:
        return 0
    added = 0
    limit = config.loras.max_file_mb * 1024 * 1024
    for path in sorted(folder.glob("*.safetensors")):
        if path.stat().st_size > limit:
            log.warning("skipping %s: over loras.max_file_mb", path.name)
            continue
        data = path.read_bytes()
        problem = safetensors_problem(data, path.stem)
        if problem:  # never registered, so no member can queue a job with it
            log.warning("skipping %s: %s", path.name, problem)
            continue
        sha = sha256_hex(data)
        blobs.put(data, ".safetensors")
        del data  # LoRA files are large; don't keep one alive through the loop
        added += sum(_register_one(db, path, sha, str(g)) for g in sorted(guild_ids))
    return added


def _register_one(db: sqlite_utils.Database, path: Path, sha: str, guild_id: str) -> bool:
    known = store.server_lora_by_sha(db, guild_id, sha)
    if known:
        return False
    try:
        store.add_lora(
            db,
            owner_id=None,
            guild_id=guild_id,
            name=path.stem,
            sha256=sha,
            size_bytes=path.stat().st_size,
            shared=True,
        )
    except store.StoreError as exc:  # a bad or duplicate name: the admin renames the file
        log.warning("server LoRA %s not registered: %s", path.name, exc)
        return False
    return True
