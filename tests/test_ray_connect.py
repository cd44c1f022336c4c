"""Joining a Ray cluster at a bad `workers.ray_address`: one line naming it, quickly, and
the event loop keeps running meanwhile. Real sockets on 127.0.0.1; no Ray cluster runs."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'sdbot[ray]')")

from pipeline.contract.pool import PoolError  # noqa: E402
from pipeline.workers.ray_pool import RayPool, code_fingerprint  # noqa: E402
from tests.test_runner import make_config, tiny_models  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends


def pool_at(address: str, tmp_path: Path, timeout_s: float = 5) -> RayPool:
    models = tiny_models(tmp_path.parent / "models")
    config = make_config(
        models, tmp_path, backend="ray", ray_address=address, ray_connect_timeout_s=timeout_s
    )
    return RayPool(config, cache_dir=tmp_path / "cache")


async def start_error(pool: RayPool) -> str:
    """The PoolError's line; the event loop must tick throughout (never blocked)."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    try:
        with pytest.raises(PoolError) as error:
            await pool.start()
    finally:
        ticker.cancel()
    assert not ray.is_initialized()
    assert ticks > 0
    return str(error.value)


async def test_nothing_listening_is_one_line_naming_the_address(tmp_path: Path) -> None:
    port = closed_port()
    line = await start_error(pool_at(f"127.0.0.1:{port}", tmp_path))
    assert line == (
        f"workers.ray_address = '127.0.0.1:{port}': cannot reach 127.0.0.1:{port} "
        "(Connection refused)"
    )


async def test_a_server_that_is_not_ray_is_named_as_such(tmp_path: Path) -> None:
    async def http_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(64)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http_only, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        line = await start_error(pool_at(f"127.0.0.1:{port}", tmp_path))
    assert line == (
        f"workers.ray_address = '127.0.0.1:{port}': 127.0.0.1:{port} answered, but not as a "
        "Ray cluster; give the head's address (port 6379 by default, or ray://head:10001 for "
        "Ray Client)"
    )


async def test_a_server_that_never_answers_is_given_up_within_the_timeout(
    tmp_path: Path,
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(64)
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        line = await start_error(pool_at(f"ray://127.0.0.1:{port}", tmp_path, timeout_s=1))
        server.close()  # the silent handler would hold the server open
    assert line == (
        f"workers.ray_address = 'ray://127.0.0.1:{port}': no answer from 127.0.0.1:{port} "
        "within 1 s"
    )


def test_the_contract_fingerprint_tells_two_sdbot_copies_apart(tmp_path: Path) -> None:
    copy = tmp_path / "pipeline"
    shutil.copytree(REPO / "pipeline" / "contract", copy / "contract")
    assert code_fingerprint(copy) == code_fingerprint()
    jobs = copy / "contract" / "jobs.py"
    jobs.write_text(jobs.read_text() + "\nEXTRA_FIELD = 1\n")
    assert code_fingerprint(copy) != code_fingerprint()


SPEAKS_GRPC_THEN_HANGS = """
import asyncio, sys
from pipeline.contract.pool import PoolError
from pipeline.workers.ray_pool import connect

async def settings_then_silence(reader, writer):
    await reader.read(64)
    writer.write(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))  # an HTTP/2 SETTINGS frame, as gRPC
    await writer.drain()
    await asyncio.sleep(3600)

async def main():
    server = await asyncio.start_server(settings_then_silence, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await connect(f"127.0.0.1:{port}", 2)
    except PoolError as exc:
        print(str(exc).replace(str(port), "PORT"))

asyncio.run(main())
"""


def test_a_cluster_that_never_finishes_the_handshake_is_given_up_and_the_process_exits() -> None:
    # In its own process: the ray.init thread that timed out cannot be stopped, and must
    # neither keep the process alive nor touch the Ray state of the tests that follow.
    done = subprocess.run(
        [sys.executable, "-c", SPEAKS_GRPC_THEN_HANGS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,  # a safety net: the process exits right after the line
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == (
        "no Ray cluster answered at workers.ray_address = '127.0.0.1:PORT' within 2 s "
        "(workers.ray_connect_timeout_s); is `ray start --head` running there?"
    )
