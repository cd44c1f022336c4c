#!/usr/bin/env bash
# The one script that runs every GPU figure the open issues name (bench/gpu_run.py
# holds the list), in one device call of at most 8 minutes. Writes $OUT/gpu.md,
# $OUT/gpu.json and $OUT/gpu.log. See BENCHMARKS.md, "GPU script".
#
#   bench/gpu.sh --fetch-wheels   here (with network): fill bench/wheels/ with what the
#                                 device machine lacks (diffusers and its missing deps)
#   bench/gpu.sh --dry-run        here: the same steps on the CPU, tiny models, 1-3 steps
#   bench/gpu.sh                  on the device: run(command="bench/gpu.sh",
#                                 carry=["bench/wheels"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/wheels
# What the device image lacks (it has torch, transformers, peft, accelerate,
# safetensors, huggingface-hub, numpy, pillow, opencv, regex, requests, filelock, scipy).
# Versions: those this project's CI uses.
MISSING=(diffusers==0.42.1 importlib_metadata==10.2.0 torchsde==0.2.6 trampoline==0.1.2 gguf==0.19.0)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p "$WHEELS"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${MISSING[@]}"
    ls -l "$WHEELS"
    exit 0
fi

PY="${PYTHON:-python3}"
if ! "$PY" -c "import diffusers" 2>/dev/null; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "diffusers is missing and $WHEELS/ has no wheels: run bench/gpu.sh --fetch-wheels" \
             "here, then carry bench/wheels" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/sdbot-site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/sdbot-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export OUT="${OUT:-bench-out}"
exec "$PY" bench/gpu_run.py "$@"
