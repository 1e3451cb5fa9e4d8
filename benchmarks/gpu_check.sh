#!/usr/bin/env bash
# The GPU check in one command (what it measures: benchmarks/gpu_check.py).
#   bash benchmarks/gpu_check.sh [--smoke] [--compile] [...]     # here (.venv) or on a GPU machine (python3)
# The device tool's machines have torch, transformers, peft and safetensors but not diffusers: fetch the wheels
# it lacks once, here, into .whl/ (git-ignored), and carry that folder with the run:
#   bash benchmarks/gpu_check.sh --fetch-wheels
#   device run: `bash benchmarks/gpu_check.sh` with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
WHEELS=("diffusers==0.42.1" "open_clip_torch==3.3.0" "importlib_metadata==8.7.0")
if [ "${1:-}" = "--fetch-wheels" ]; then
    rm -rf .whl && mkdir -p .whl
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
        --platform any -d .whl "${WHEELS[@]}"
    ls -la .whl
    exit 0
fi
if ! "$python" -c "import diffusers, open_clip" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    # carried wheels, installed beside the machine's own packages
    site=${TMPDIR:-/tmp}/unziplora-site
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" benchmarks/gpu_check.py "$@"
