"""End to end: prompt filters, role gates, quotas across a bot restart, a burst of
commands, DMs refused, the server LoRA library from Discord, the audit log; and
/metrics and /healthz (scraped over HTTP, parsed with prometheus_client's parser)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import aiohttp
import pytest
from diffusers import StableDiffusionPipeline
from prometheus_client.parser import text_string_to_metric_families

from bot import store
from pipeline.contract.blobs import BlobStore
from tests.botkit import *  # noqa: F403 - the end-to-end kit (botkit.__all__)
from tests.lycoris_files import write_lora

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]


async def admin(emu, subcommand, **options):  # noqa: F811
    return await reply(
        await emu.send_command("admin", options, subcommand=subcommand, user=emu.admin)
    )


async def test_filters_roles_quotas_burst_library_and_audit(emu, shared_pool, tiny_sd, tmp_path):  # noqa: F811
    artist = emu.add_role("Artist")
    carol = emu.add_member("carol", role_ids=(artist,))
    config = make_config(
        tiny_sd,
        data_dir_for(shared_pool, tmp_path),
        emu,
        safety={"dms": "refuse"},
        limits={"commands_per_minute": 12},
    )
    lora_file = write_lora(
        tmp_path / "style.safetensors", StableDiffusionPipeline.from_pretrained(tiny_sd), "kohya"
    )
    async with running_sdbot(config, shared_pool):
        db = store.open_db(config.storage.database)
        # Filters: a word (caught through spacing and homoglyphs), a catastrophic regex.
        added = await admin(emu, "filter add", kind="word", pattern="Forbidden")
        evil = await admin(emu, "filter add", kind="regex", pattern="^(a|a)*$")
        spaced = await error_reply(await imagine(emu, "a f o r b i d d e n cat"))
        homoglyph = await error_reply(await imagine(emu, "a forb\u0456dd\u0435n cat"))
        zero_width = await error_reply(await imagine(emu, "a for\u200bbidden cat"))
        # Role gate: /imagine only for Artists (and admins).
        gated = await admin(emu, "allow", command="imagine", role=artist)
        refused_role = await error_reply(await imagine(emu, "a cat"))
        carol_job = await queued_job(await imagine(emu, "a cat", user=carol))
        await admin(emu, "allow", command="imagine", role=artist, allowed=False)
        # Quota: bob may queue one image a day.
        quota = await admin(emu, "quota", target=emu.bob, images_per_day=1)
        await queued_job(await imagine(emu, "a dog", user=emu.bob))
        spent = await error_reply(await imagine(emu, "a dog", user=emu.bob))
        # DMs are refused by config.
        in_dm = await error_reply(await emu.send_command("imagine", {"prompt": "a cat"}, dm=True))
        # The server library, from Discord: add (validated in the helper), list, promote.
        library = await admin(
            emu, "lora add", file=attach(emu, lora_file.read_bytes(), "style.safetensors"),
            name="style",
        )  # fmt: skip
        not_a_lora = await admin(
            emu, "lora add", file=attach(emu, b"not a lora", "bad.safetensors"), name="bad"
        )
        sha = BlobStore(config.storage.blobs).put(lora_file.read_bytes(), ".safetensors")
        store.add_lora(
            db, owner_id=emu.alice.id, guild_id=emu.guild_id, name="alices", sha256=sha,
            size_bytes=lora_file.stat().st_size, shared=True,
        )  # fmt: skip
        promoted = await admin(emu, "lora promote", name="alices", new_name="house")
        listed = await admin(emu, "lora list")
        jobs_before = len(store.user_jobs(db, emu.alice.id, limit=100))
        await wait_result(emu, carol_job)
    # A restart: quotas are counted from the jobs, so bob's is still spent.
    async with running_sdbot(config, shared_pool):
        still_spent = await error_reply(await imagine(emu, "a dog", user=emu.bob))
        left = await reply(await emu.send_command("queue", {}, user=emu.bob))
        # A burst of 30 commands in well under 10 s: past 12 a minute, "slow down".
        started = time.monotonic()
        answers = [
            (await reply(await emu.send_command("queue", {}), timeout=10))["content"]
            for _ in range(30)
        ]
        burst_s = time.monotonic() - started
        others = await reply(await emu.send_command("queue", {}, user=emu.bob))
        audit = await admin(emu, "audit")
        jobs_after = len(store.user_jobs(db, emu.alice.id, limit=100))
    db.close()

    assert "Added the word filter `forbidden`" in added["content"]
    assert "backtracks catastrophically" in evil["content"]
    for refusal in (spaced, homoglyph, zero_width):
        assert "does not allow" in refusal and "forbidden" not in refusal.lower()
    assert "now for: Artist" in gated["content"]
    assert "for members with the role Artist" in refused_role
    assert "images per day: 1" in quota["content"]
    assert "quota here is 1 images per day" in spent and "0 left" in spent
    assert still_spent == spent
    assert "0 of 1 images per day" in left["content"]
    assert "turned off in DMs" in in_dm
    assert "Added **style**" in library["content"] and "(lora, sd1," in library["content"]
    assert "not a LoRA file" in not_a_lora["content"]
    assert "**house** is now in the server library" in promoted["content"]
    assert "**style**" in listed["content"] and "**house**" in listed["content"]
    assert jobs_after == jobs_before  # refusals queued nothing
    slow_down = [a for a in answers if a.startswith("Slow down")]
    assert burst_s < 10 and len(slow_down) >= 30 - 12, answers
    assert "12 commands a minute" in slow_down[0]
    assert "Your jobs" in others["content"] or "no jobs" in others["content"]
    for action in ("filter add", "allow", "quota", "lora add", "lora promote"):
        assert f"**{action}**" in audit["content"], audit["content"]


def measured(pool) -> bool:
    """Whether every loaded model of the pool's workers has a measured peak."""
    memory = [m for w in pool.workers() for m in w.memory.values()]
    return bool(memory) and all(m.peak_bytes for m in memory)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_metrics_and_healthz(emu, shared_pool, tiny_sd, tmp_path):  # noqa: F811
    port = free_port()
    config = make_config(
        tiny_sd, data_dir_for(shared_pool, tmp_path), emu, metrics={"listen": f"127.0.0.1:{port}"}
    )
    base = f"http://127.0.0.1:{port}"
    async with running_sdbot(config, shared_pool), aiohttp.ClientSession() as http:

        async def get(path):
            async with http.get(base + path) as response:
                return response.status, await response.text()

        job = await queued_job(await imagine(emu, "a lighthouse"))
        await wait_result(emu, job)
        # The worker reports what it holds just after its batch's last event.
        await emu.wait_for(lambda: measured(shared_pool), 30)
        status, text = await get("/metrics")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        healthy = await get("/healthz")
        # The worker dies (a real SIGKILL while it runs a job): 503 until it is back.
        slow = await queued_job(await imagine(emu, "slow", steps=150, size="256x256"))
        db = store.open_db(config.storage.database)
        await emu.wait_for(lambda: store.get_job(db, slow)["status"] == "running", 60)
        # "running" is written when the job is claimed, a moment before a worker holds it.
        pid = None
        for _ in range(600):
            if (pid := await shared_pool.worker_pid(slow)) is not None:
                break
            await asyncio.sleep(0.05)
        assert pid is not None, "the slow job never reached a worker"
        os.kill(pid, signal.SIGKILL)
        unhealthy = None
        for _ in range(200):
            unhealthy = await get("/healthz")
            if unhealthy[0] == 503:
                break
            await asyncio.sleep(0.05)
        await reply(await emu.send_command("cancel", {"job": slow}))
        for _ in range(600):  # back to healthy: the next test gets a working pool
            if (await get("/healthz"))[0] == 200:
                break
            await asyncio.sleep(0.1)
        recovered = await get("/healthz")
        db.close()

    def sample(name, **labels):
        return next(
            s.value
            for f in families.values()
            for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert status == 200
    assert sample("sdbot_jobs", kind="generate", status="done") >= 1
    assert sample("sdbot_queue_depth", kind="generate") == 0
    assert sample("sdbot_job_run_seconds_count", kind="generate") >= 1
    assert sample("sdbot_job_wait_seconds_count", kind="generate") >= 1
    assert sample("sdbot_job_outcomes_total", kind="generate", outcome="done") >= 1
    assert sample("sdbot_workers", state="idle") + sample("sdbot_workers", state="busy") == 1
    assert {"sdbot_nsfw_blocks", "sdbot_discord_http_errors"} <= set(families)
    # Memory per loaded model (issue 26): the plan the worker chose for the tiny model on
    # the CPU, its estimate (for the largest job the limits allow: 1.0 GB, mostly a 1024²
    # VAE decode), and the peak RSS measured over the small lighthouse job, which counts
    # the worker's torch besides the model (well over 100 MB).
    worker = next(iter(shared_pool.workers())).name
    assert sample("sdbot_worker_model_plan", worker=worker, model="tiny", plan="full") == 1
    estimated = sample("sdbot_worker_model_estimated_peak_bytes", worker=worker, model="tiny")
    peak = sample("sdbot_worker_model_peak_bytes", worker=worker, model="tiny", measure="rss")
    assert 0.5 * 2**30 < estimated < 2 * 2**30, estimated
    assert 100 * 2**20 < peak < 16 * 2**30, peak
    assert healthy == (200, "ok\n")
    assert unhealthy[0] == 503 and "workers: none ready" in unhealthy[1], unhealthy
    assert recovered[0] == 200
