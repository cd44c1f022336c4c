"""bench/gpu.sh --dry-run: every step of the GPU script runs on the CPU with the tiny
models and writes the same outputs, so a typo cannot waste a lent GPU's minutes.

About a minute of CPU (one benchmark process per step). It is in the default run: a
benchmark that broke with a refactoring (it did, twice, while this test was opt-in)
is found before a lent GPU's minutes are spent on it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.gpu_dry_run
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bash, /proc")
def test_the_gpu_script_dry_run_runs_every_step_and_writes_its_tables(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        ["bash", "bench/gpu.sh", "--dry-run", "--work", str(tmp_path / "work")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    out = tmp_path / "out"
    log = (out / "gpu.log").read_text() if (out / "gpu.log").exists() else done.stderr
    assert done.returncode == 0, log[-4000:]
    # What comes back from the device: three files, nothing deeper.
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json", "gpu.log", "gpu.md"]
    report = json.loads((out / "gpu.json").read_text())
    assert report["dry_run"] is True
    names = [step["name"] for step in report["steps"]]
    assert any(n.startswith("bench_arch SD 1.5") for n in names)
    assert any(n.startswith("bench_arch SDXL") for n in names)
    expected = {"bench_speed", "bench_lora_slots", "bench_loras", "bench_train", "bench_flux"}
    expected |= {"bench_families_2026"}
    assert expected <= {n.split()[0] for n in names}
    assert all(step["rc"] == 0 for step in report["steps"]), names
    table = (out / "gpu.md").read_text()
    assert table.count("| ok |") == len(names)
    for step in report["steps"]:
        if not step["name"].startswith("bench_arch"):
            # each bench printed its table (a markdown separator row)
            assert re.search(r"^\|\s*-{3,}\s*\|", step["output"], re.M), step["name"]
            continue
        [run] = step["results"]  # one dtype in the dry run
        cases = run["results"]
        assert list(cases) == ["txt2img", "lora", "img2img", "inpaint", "train"]
        for case, sides in cases.items():
            for side, result in sides.items():
                if result.get("skipped"):  # plain diffusers trains SD 1.x only
                    assert (case, side) == ("train", "plain diffusers") and "SDXL" in step["name"]
                    continue
                assert "error" not in result, (step["name"], case, side, result)
                assert result["seconds"] > 0 and result["peak_rss_mb"] > 0
