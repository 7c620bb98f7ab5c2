#!/usr/bin/env bash
# Set up a fresh machine for raydistill: a venv in .venv with CPU torch, the project and its test extras,
# and bubblewrap for the sandbox's namespace isolation (when we may install system packages).
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch, ray, transformers, peft, faiss" || { echo "bootstrap: dependency install failed" >&2; exit 1; }
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) >/dev/null 2>&1 \
      || echo "bootstrap: could not install bubblewrap; the sandbox will use its weaker fallback and say so" >&2
  else
    echo "bootstrap: bubblewrap missing (install it: apt-get install bubblewrap); the sandbox will use its weaker fallback" >&2
  fi
fi
echo "bootstrap: ready ($(python --version), torch $(python -c 'import torch; print(torch.__version__)'))"
