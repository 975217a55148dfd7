#!/usr/bin/env bash
# Every GPU check of ptq in one command, with a report (docs/kernels.md, "Device check"):
#   scripts/device_check.sh                        # on a GPU machine (at most --budget-s seconds, default 450)
#   scripts/device_check.sh --dry-run              # anywhere: commands, imports, wheel coverage; CUDA steps skipped
#   scripts/device_check.sh --download-wheels DIR  # here, with PyPI: DIR/wheels, what the device image lacks
#   scripts/device_check.sh --stage-model DIR      # here: the embedded GGUF as DIR/model-1 + DIR/model-2
# All options: scripts/device_check.sh --help. Uses .venv/bin/python where there is one, else $PYTHON or python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
fi
unset TRITON_INTERPRET  # the kernels must compile for the GPU, never run in Triton's interpreter
exec env PYTHONUNBUFFERED=1 "$PY" scripts/device_check.py "$@"
