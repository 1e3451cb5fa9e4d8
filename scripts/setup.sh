#!/usr/bin/env bash
# Create .venv in the repository root and install the project with its test tools.
#   torch: the CPU wheel 2.13.0 by default (on the project's dev/CI machines it lies on local disk).
#   On a GPU machine: TORCH_SPEC="torch==2.13.0" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#   bash scripts/setup.sh   (or any CUDA build of torch >= 2.4 already in the venv: it is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.13.0}"
fi
# The rest through uv when it can be had (a minute, where pip takes four); pip otherwise. The torch above stays.
install=("${pip[@]}")
if "${pip[@]}" uv 2>/dev/null; then
    install=(.venv/bin/python -m uv pip install --quiet --python .venv/bin/python --compile-bytecode)
fi
"${install[@]}" -e '.[dev]' || "${pip[@]}" -e '.[dev]'
# Only its BPE vocabulary file is used (offline CLIP tokenizers); --no-deps keeps torchvision out,
# which would break `import diffusers` beside the CPU torch wheel.
"${install[@]}" --no-deps "open-clip-torch==3.3.0" || "${pip[@]}" --no-deps "open-clip-torch==3.3.0"
# The style-bank gallery test renders the page in Debian's headless chromium; install it when we can.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get install -y --no-install-recommends chromium || { apt-get update && apt-get install -y \
        --no-install-recommends chromium; }; } >/dev/null 2>&1 || echo "warning: chromium not installed; the gallery test will skip"
fi
# The registry test and benchmark run an MLflow server on Debian's PostgreSQL (started by them, as root).
if [ ! -d /usr/lib/postgresql ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get install -y --no-install-recommends postgresql || { apt-get update && apt-get install -y \
        --no-install-recommends postgresql; }; } >/dev/null 2>&1 || echo "warning: postgresql not installed; its registry test will skip"
fi
.venv/bin/python -c "import unziplora, torch; print('unziplora ready; torch', torch.__version__)"
