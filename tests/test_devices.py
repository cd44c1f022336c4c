"""Device and dtype policy (a pure function of the device), and devices a machine lacks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.contract.config import ConfigError, config_from_dict
from pipeline.contract.devices import DeviceError, check_devices, dtype_for, dtype_warning
from pipeline.workers.local_pool import LocalPool, PoolError, make_pool


@pytest.mark.parametrize(
    ("kind", "capability", "configured", "expected"),
    [
        ("cuda", (9, 0), "auto", "bfloat16"),  # H100
        ("cuda", (8, 0), "auto", "bfloat16"),  # A100
        ("cuda", (8, 6), "auto", "bfloat16"),  # RTX 30xx
        ("cuda", (7, 5), "auto", "float16"),  # T4: bf16 only emulated
        ("cuda", (7, 0), "auto", "float16"),  # V100
        ("cuda", None, "auto", "float16"),
        ("cpu", None, "auto", "float32"),
        ("mps", None, "auto", "float32"),
        ("cuda", (9, 0), "float32", "float32"),  # an explicit dtype is used as configured
        ("cuda", (7, 5), "bfloat16", "bfloat16"),
        ("cpu", None, "float16", "float16"),
        ("cpu", None, "bfloat16", "bfloat16"),
    ],
)
def test_dtype_policy(kind, capability, configured, expected):
    assert dtype_for(kind, capability, configured) == expected


def test_dtype_warnings_name_the_reason():
    assert "emulated on compute capability 7.5" in dtype_warning("cuda", (7, 5), "bfloat16")
    assert dtype_warning("cuda", (8, 0), "bfloat16") == ""
    assert "slower than float32" in dtype_warning("cpu", None, "float16")
    assert dtype_warning("cuda", (7, 5), "float16") == ""
    with pytest.raises(DeviceError, match="workers.dtype = 'float8' is not supported"):
        dtype_for("cuda", (9, 0), "float8")


def test_config_refuses_an_unknown_dtype_or_device_in_one_line():
    models = {"m": {"source": "x"}}
    with pytest.raises(ConfigError) as bad_dtype:
        config_from_dict({"models": models, "workers": {"dtype": "float8"}}, path="c.toml")
    assert str(bad_dtype.value) == (
        "c.toml: workers.dtype = 'float8' is not supported; "
        "use one of auto, float16, bfloat16, float32"
    )
    with pytest.raises(ConfigError, match="'gpu0' is not a device; use auto, cpu, mps, cuda"):
        config_from_dict({"models": models, "workers": {"devices": ["gpu0"]}})
    config_from_dict({"models": models, "workers": {"devices": ["cuda:1", "cpu"]}})


def test_check_devices_names_the_device_and_what_there_is():
    check_devices(["cpu", "cuda", "cuda:0"], 1)
    with pytest.raises(DeviceError) as one:
        check_devices(["cuda:0", "cuda:7"], 1, how="nvidia-smi -L")
    assert str(one.value) == (
        "workers.devices: cuda:7 does not exist; this machine has 1 GPU(s): cuda:0 "
        "(nvidia-smi -L). Use auto, cpu or one of those."
    )
    with pytest.raises(DeviceError, match="cuda:1 does not exist; this machine has no GPU"):
        check_devices(["cuda:1"], 0)


def _config(tmp_path: Path, devices: list[str]):
    return config_from_dict(
        {
            "models": {"m": {"source": str(tmp_path / "none")}},
            "workers": {"devices": devices},
            "storage": {"data_dir": str(tmp_path)},
        }
    )


def test_the_pool_refuses_a_gpu_this_machine_lacks_before_any_worker_starts(tmp_path):
    # This machine's GPU count comes from nvidia-smi (0 where it is missing): cuda:7 is
    # beyond it on any test machine.
    with pytest.raises(PoolError, match=r"^workers.devices: cuda:7 does not exist; this machine"):
        make_pool(_config(tmp_path, ["cuda:7"]))


def test_a_worker_that_cannot_use_its_device_fails_the_pool_start_and_takes_no_job(
    tmp_path,
):
    # Past the bot-side check (devices given): the worker asks torch itself.
    import torch

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    pool = LocalPool(_config(tmp_path, ["cpu"]), devices=["cuda:7"])

    async def start() -> str:
        try:
            with pytest.raises(PoolError) as failed:
                await asyncio.wait_for(pool.start(), 120)
            assert pool.free_workers() == 0
            return str(failed.value)
        finally:
            await pool.close()

    message = asyncio.run(start())
    assert message.startswith("workers.devices: cuda:7 does not exist; this machine has ")
    assert "torch" in message and "\n" not in message


def test_doctor_refuses_an_unknown_dtype_in_one_line(tmp_path):
    (tmp_path / "config.toml").write_text('[models.m]\nsource = "x"\n[workers]\ndtype = "float8"\n')
    result = subprocess.run(
        [sys.executable, "-m", "bot.cli", "doctor"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path.cwd()), "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: config.toml: workers.dtype = 'float8' is not supported; "
        "use one of auto, float16, bfloat16, float32"
    ]
