"""Every GPU figure the open issues name, in one run of at most 8 minutes (bench/gpu.sh).

Each step is one benchmark command with its own time budget; a step that fails or
runs out of time is recorded as such and the next one still runs. At the end
`$OUT/gpu.md` (a markdown table of the steps, then each step's own table) and
`$OUT/gpu.json` (the same, machine-readable, with bench_arch's figures) are written,
and `$OUT/gpu.log` holds every step's output.

`--dry-run` runs the same steps on the CPU with the tiny models, float32 and a step
or two, so that a typo cannot waste a lent GPU's minutes.

Adding a figure: append a Step to `steps()` (HOOK below) with the command, its budget
and the issue it answers. Keep the total within TOTAL_BUDGET_S.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 460  # 8 minutes for the device call, less the wheel install and start
# The dry run checks that every step works, not how fast: a shared CPU gets room.
DRY_BUDGET_S, DRY_TOTAL_BUDGET_S = 300, 1500


@dataclass
class Step:
    name: str
    issue: str
    command: list[str]
    budget_s: int
    # filled in by run_step
    rc: int | None = None
    seconds: float = 0.0
    output: str = ""
    results: list = field(default_factory=list)  # bench_arch JSON, when the step writes it
    writes: str = ""  # the JSON file (under $OUT) the step writes, folded into gpu.json


def steps(dry: bool, out: Path, work: Path) -> list[Step]:
    """The step list: the same commands for the GPU and the dry run, smaller there."""
    py = [sys.executable]
    device = "cpu" if dry else "cuda"
    sd15 = str(work / ("tiny" if dry else "sd15"))
    sdxl = str(work / ("tiny-xl" if dry else "sdxl"))
    dtypes = ["float32"] if dry else ["float16", "bfloat16"]
    threads = ["--threads", "1"] if dry else []
    arch = [
        "--device",
        device,
        "--in-process",
        "--steps",
        "1" if dry else "2",
        "--save-dtype",
        "float32" if dry else "float16",
        "--out",
        str(out),
        *threads,
    ]
    # In order of what the open issues need most: a step the total budget cuts short
    # is one of the last. bench_arch SD 1.5 comes first: it writes the SD 1.5 model the
    # others load; then the open issues' steps (#23 Flux.1 storages, #26 memory plans),
    # which fit TOTAL_BUDGET_S together with it. The budgets of all steps add up to
    # about twice the total: what one device call does not reach, a later lent card runs
    # with `--only <name>`. (bench_generate's plain-vs-ours it/s at 30 steps is bench_speed's
    # plain and eager rows, so it is not run here.)
    return [
        Step(
            "bench_arch SD 1.5, 512², fp16 and bf16",
            "11",
            [*py, "bench/bench_arch.py", "--arch", "tiny" if dry else "sd15", "--model-dir", sd15]
            + ["--dtype", *dtypes, *arch],
            80 if not dry else DRY_BUDGET_S,
            writes=f"bench_arch-{'tiny' if dry else 'sd15'}-{device}.json",
        ),
        # Three storages, each side loaded from disk: an estimate (no GPU has run it) of
        # imports ~8 s, the architecture folder ~8 s, its GGUF ~7 s (timed in the step's
        # output), each storage ~20 s; 90 s leaves room.
        Step(
            "bench_flux Flux.1 architecture (1+1 blocks, full width), 1024², bf16 / fp8 "
            "storage / GGUF Q8_0: ours / plain",
            "23",
            [*py, "bench/bench_flux.py", "--device", device, "--rounds", "1" if dry else "3"]
            + ["--storage", "full", "fp8", "gguf-q8"]
            + (["--steps", "2", "--threads", "1"] if dry else ["--arch", "--size", "1024"]),
            90 if not dry else DRY_BUDGET_S,
        ),
        # Issue 26: the memory planner's estimate beside torch.cuda.max_memory_allocated for
        # every step of the GPU ladder (each loaded through the worker's path, one process);
        # the dry run measures the CPU's ladder (full, fp8) the same way, on tiny models.
        Step(
            "bench_memory_plan SD 1.5, 512², every GPU plan: estimated vs measured peak",
            "26",
            [*py, "bench/bench_memory_plan.py", "--model", sd15, "--device", device]
            + ["--ladder", "--in-process", "--sizes", "64" if dry else "512", "--steps", "2"],
            45 if not dry else DRY_BUDGET_S,
        ),
        Step(
            "bench_memory_plan Flux.1 architecture (1+1 blocks, full width), 1024², "
            "every GPU plan: estimated vs measured peak",
            "26",
            [*py, "bench/bench_memory_plan.py", "--device", device, "--ladder", "--in-process"]
            + ["--arch", "tiny-flux" if dry else "flux"]
            + ["--model", str(work / ("tiny-flux-memory" if dry else "flux-memory-arch"))]
            + ["--sizes", "64" if dry else "1024", "--steps", "2"],
            90 if not dry else DRY_BUDGET_S,
        ),
        Step(
            "bench_families_2026 Z-Image, Qwen-Image, Flux.2 klein 4B architectures "
            "(1 block, full width), 1024², bf16: ours / plain",
            "24",
            [*py, "bench/bench_families_2026.py", "--device", device]
            + ["--rounds", "1" if dry else "3", "--steps", "3" if dry else "8"]
            + (["--threads", "1"] if dry else ["--arch", "--size", "1024"]),
            60 if not dry else DRY_BUDGET_S,
        ),
        Step(
            "bench_train_flow Flux.1 architecture (1+1 blocks, full width), 512², bf16: "
            "our training loop / the script's step",
            "23",
            [*py, "bench/bench_train_flow.py", "--device", device]
            + ["--resolutions", "64" if dry else "512", "--steps", "3" if dry else "20"]
            + ["--repeats", "1" if dry else "3", *threads]
            + ([] if dry else ["--arch", "--dtype", "bfloat16"]),
            90 if not dry else DRY_BUDGET_S,
        ),
        Step(
            "bench_speed SD 1.5, 512², 30 steps, fp16: plain / eager / compiled",
            "13",
            [*py, "bench/bench_speed.py", "--model", sd15, "--device", device]
            + ["--dtype", dtypes[0], "--size", "64" if dry else "512"]
            + ["--steps", "2" if dry else "30", "--batches", "1", "4"]
            + ["--rounds", "1" if dry else "3", "--shared", "--out", str(out)]
            # max-autotune tunes every kernel for minutes; the default mode compiles in
            # about a minute and is what fits the device call. The dry run checks the
            # commands on dynamo's aot_eager (no C++ codegen).
            + ["--compile-mode", "default", *threads]
            + (["--backend", "aot_eager"] if dry else []),
            110 if not dry else DRY_BUDGET_S,
            writes="bench_speed.json",
        ),
        Step(
            "bench_lora_slots SD 1.5, 512², 20 steps, fp16",
            "13",
            [*py, "bench/bench_lora_slots.py", "--model", sd15, "--device", device]
            + ["--dtype", dtypes[0], "--size", "64" if dry else "512"]
            + ["--steps", "1" if dry else "20", "--rounds", "1" if dry else "2", *threads]
            # inductor's default mode on CUDA: max-autotune's kernel search would not fit;
            # the dry run checks the commands on dynamo's aot_eager (no C++ codegen)
            + (["--backend", "aot_eager"] if dry else ["--cuda-mode", "default"]),
            70 if not dry else DRY_BUDGET_S,
        ),
        Step(
            "bench_control SD 1.5, 512², ControlNet units and IP-Adapter, preprocessors",
            "14",
            [*py, "bench/bench_control.py", "--model", sd15, "--device", device]
            + ["--size", "64" if dry else "512", "--runs", "1" if dry else "3"]
            + ["--short", "1" if dry else "2", "--long", "2" if dry else "10"]
            + ["--preprocessors", "--and-prompt", *threads],
            50 if not dry else DRY_BUDGET_S,
        ),
        Step(
            "bench_arch SDXL, 1024², fp16 and bf16",
            "11",
            [*py, "bench/bench_arch.py", "--arch", "tiny-xl" if dry else "sdxl"]
            + ["--model-dir", sdxl, "--dtype", *dtypes, *arch],
            100 if not dry else DRY_BUDGET_S,
            writes=f"bench_arch-{'tiny-xl' if dry else 'sdxl'}-{device}.json",
        ),
        Step(
            "bench_loras SD 1.5, 512², 20 steps, fp16",
            "3",
            [*py, "bench/bench_loras.py", "--model", sd15, "--device", device, "--no-formats"]
            + ["--dtype", dtypes[0], "--size", "64" if dry else "512"]
            + ["--steps", "1" if dry else "20", "--repeats", "1"],
            25 if not dry else DRY_BUDGET_S,
        ),
        Step(
            "bench_train SD 1.5, 512², 20 steps",
            "6",
            [*py, "bench/bench_train.py", "--model", sd15, "--device", device]
            + ["--resolutions", "64" if dry else "512", "--steps", "3" if dry else "20"]
            + ["--repeats", "1", *threads],
            25 if not dry else DRY_BUDGET_S,
        ),
        # HOOK: later figures go here, e.g.
        # Step("bench_pool on cuda", "4", [*py, "bench/bench_pool.py", ...], 40),
    ]


def run_step(step: Step, deadline: float, log, env: dict[str, str]) -> None:
    budget = max(1, min(step.budget_s, int(deadline - time.monotonic())))
    log.write(f"\n===== {step.name} (budget {budget} s)\n$ {' '.join(step.command)}\n")
    log.flush()
    start = time.monotonic()
    try:
        done = subprocess.run(
            step.command,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=budget,
        )
        step.rc, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        step.rc = 124
        output = _text(exc.stdout) + _text(exc.stderr) + f"\n(stopped after {budget} s)"
    step.seconds = time.monotonic() - start
    log.write(output + f"\n===== rc {step.rc}, {step.seconds:.1f} s\n")
    log.flush()
    step.output = _tables(output)


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _tables(output: str) -> str:
    """The markdown a bench prints (its table and the lines around it), not its logs."""
    keep = [
        line
        for line in output.splitlines()
        if line.startswith(("|", "**", "command", "Reproduce", "card", "model loaded"))
        or "steps" in line[:80]
        and not line.startswith(("Loading", "[", " "))
    ]
    return "\n".join(keep[-60:])


def report(all_steps: list[Step], out: Path, dry: bool, started: float) -> None:
    for step in all_steps:
        path = out / step.writes
        if step.writes and path.exists():
            step.results = json.loads(path.read_text())
            path.unlink()  # at most 8 files come back from the device: fold it in
            path.with_suffix(".md").unlink(missing_ok=True)  # its table is in the output
    card = _card()
    head = [
        "# GPU figures" + (" (dry run: CPU, tiny models)" if dry else ""),
        "",
        f"card: {card}; total {time.monotonic() - started:.0f} s; command: bench/gpu.sh"
        + (" --dry-run" if dry else ""),
        "",
        "| step | issue | status | seconds |",
        "|---|---|---|---|",
    ]
    for step in all_steps:
        status = {0: "ok", 124: "timed out", None: "not run"}.get(step.rc, f"failed (rc {step.rc})")
        head.append(f"| {step.name} | #{step.issue} | {status} | {step.seconds:.1f} |")
    body = [f"\n## {step.name}\n\n{step.output or '(no output)'}" for step in all_steps]
    (out / "gpu.md").write_text("\n".join(head + body) + "\n")
    (out / "gpu.json").write_text(
        json.dumps(
            {"dry_run": dry, "card": card, "steps": [asdict(step) for step in all_steps]},
            indent=1,
        )
    )


def _card() -> str:
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        return listing.stdout.strip().replace("\n", "; ") or "no GPU"
    except (OSError, subprocess.TimeoutExpired):
        return "no GPU (nvidia-smi not found)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--work", default="", help="models and scratch (default: /tmp/sdbot-gpu)")
    parser.add_argument("--only", nargs="*", default=[], help="run the steps whose name has this")
    args = parser.parse_args()
    started = time.monotonic()
    deadline = started + (DRY_TOTAL_BUDGET_S if args.dry_run else TOTAL_BUDGET_S)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or "/tmp/sdbot-gpu" + ("-dry" if args.dry_run else ""))
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if args.dry_run:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    all_steps = steps(args.dry_run, out, work)
    if args.only:
        all_steps = [s for s in all_steps if any(word in s.name for word in args.only)]
    with open(out / "gpu.log", "w") as log:
        for step in all_steps:
            if time.monotonic() >= deadline - 5:
                log.write(f"\n===== {step.name}: no time left\n")
                continue
            run_step(step, deadline, log, env)
            print(f"{step.name}: rc {step.rc}, {step.seconds:.1f} s", flush=True)
    report(all_steps, out, args.dry_run, started)
    print(f"wrote {out / 'gpu.md'} and {out / 'gpu.json'}")
    return 0 if all(step.rc == 0 for step in all_steps) else 1


if __name__ == "__main__":
    sys.exit(main())
