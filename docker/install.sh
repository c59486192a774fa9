#!/usr/bin/env bash
# The one install path: the container images, CI and a fresh checkout all run this script, so CI tests what the
# images install. Usage: PYTHON=/path/to/python docker/install.sh [cpu|gpu]
set -euo pipefail
PY=${PYTHON:-python3}
TARGET=${1:-cpu}
cd "$(dirname "$0")/.."
"$PY" -m pip install --quiet --upgrade pip
if [ "$TARGET" = gpu ]; then
  # CUDA torch from the default index, GPU FAISS instead of the CPU build.
  "$PY" -m pip install --quiet "torch>=2.3,<3" faiss-gpu-cu12
else
  # The CPU wheel; a bare `torch` would pull a multi-GB CUDA build.
  "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -e ".[demo,test]"
