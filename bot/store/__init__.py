"""The bot's durable state in SQLite: jobs and the fair queue, member settings, LoRAs.

Plain functions that take a ``sqlite_utils.Database`` and return dicts (JSON
columns decoded). SQLite is the single source of truth: a restart loses
nothing, and two processes may share one database file.

This package is the one way in: callers write ``from bot import store`` and
``store.enqueue(db, ...)``; the sections live in their own modules:

- :mod:`bot.store.core`: job statuses and the SQL helpers every section uses;
- :mod:`bot.store.errors`: the errors, each message written for the member;
- :mod:`bot.store.schema`: opening the file and the numbered migrations;
- :mod:`bot.store.queue`: jobs and the fair queue (enqueue, claim, outcomes, positions);
- :mod:`bot.store.settings`: each member's saved defaults;
- :mod:`bot.store.loras`: the LoRA registry;
- :mod:`bot.store.blobs`: which blob-store files are still referenced;
- :mod:`bot.store.privacy`: /forget;
- :mod:`bot.store.guild`: per-server state (settings, prompt filters, role gates, quotas,
  the audit log, each job's channel context).
"""

from bot.store.blobs import BLOB_KEYS, blob_refs
from bot.store.core import TERMINAL, JobStatus
from bot.store.errors import (
    DuplicateName,
    InvalidName,
    JobNotFound,
    LoraNotFound,
    NotYours,
    QueueFull,
    StoreError,
)
from bot.store.guild import (
    add_filter,
    allow_role,
    audit,
    audit_log,
    command_roles,
    filters,
    guild_settings,
    job_context,
    metrics_counts,
    quotas,
    remove_filter,
    set_guild_setting,
    set_job_context,
    set_quota,
    usage,
)
from bot.store.loras import (
    add_lora,
    delete_lora,
    find_lora,
    get_lora,
    list_loras,
    lora_of_job,
    lora_registered,
    lora_usage,
    rename_lora,
    server_lora_by_sha,
    set_lora_shared,
)
from bot.store.privacy import forget_user, posted_messages
from bot.store.queue import (
    busy_count,
    cancel,
    claim_next,
    enqueue,
    fail,
    finish,
    generation_waiting,
    get_job,
    job_stats,
    mark_cancelled,
    pause,
    peek_next,
    queue_position,
    queue_positions,
    queued_count,
    queued_for_models,
    requeue_interrupted,
    require_job,
    set_job_messages,
    set_priority,
    unposted_results,
    user_jobs,
)
from bot.store.schema import MIGRATIONS, migrate, open_db
from bot.store.settings import get_settings, reset_settings, update_settings

__all__ = [
    "BLOB_KEYS",
    "MIGRATIONS",
    "TERMINAL",
    "DuplicateName",
    "InvalidName",
    "JobNotFound",
    "JobStatus",
    "LoraNotFound",
    "NotYours",
    "QueueFull",
    "StoreError",
    "add_filter",
    "add_lora",
    "allow_role",
    "audit",
    "audit_log",
    "blob_refs",
    "busy_count",
    "cancel",
    "claim_next",
    "command_roles",
    "delete_lora",
    "enqueue",
    "fail",
    "filters",
    "find_lora",
    "finish",
    "forget_user",
    "generation_waiting",
    "queued_for_models",
    "get_job",
    "get_lora",
    "get_settings",
    "guild_settings",
    "job_context",
    "job_stats",
    "list_loras",
    "lora_of_job",
    "lora_registered",
    "lora_usage",
    "mark_cancelled",
    "metrics_counts",
    "migrate",
    "open_db",
    "pause",
    "peek_next",
    "posted_messages",
    "queue_position",
    "queue_positions",
    "queued_count",
    "quotas",
    "remove_filter",
    "rename_lora",
    "requeue_interrupted",
    "require_job",
    "reset_settings",
    "server_lora_by_sha",
    "set_guild_setting",
    "set_job_context",
    "set_job_messages",
    "set_lora_shared",
    "set_priority",
    "set_quota",
    "unposted_results",
    "update_settings",
    "usage",
    "user_jobs",
]
