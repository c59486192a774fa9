#!/usr/bin/env bash
# The one install path: the container images, CI and a fresh checkout all run this script, so CI tests what the
# images install. Usage: PYTHON=/path/to/python docker/install.sh [cpu|gpu] [--cluster]
#   cpu        torch CPU build + faiss-cpu (what `make test` / CI install into .venv)
#   gpu        torch CUDA build + GPU FAISS (faiss-gpu-cu12 replaces faiss-cpu)
#   --cluster  also Ray's dashboard / job server (ray[default], same Ray version), which a Ray head needs for
#              `ray job submit` and KubeRay; the images pass it, `make` does not need it.
# Environment: PYTHON (default python3); TORCH_INDEX_URL, the index torch comes from (the images set it: on PyPI
# the Linux torch wheel is the multi-GB CUDA build; unset, pip's configured indexes are used).
set -euo pipefail
PY=${PYTHON:-python3}
TARGET=${1:-cpu}
CLUSTER=${2:-}
TORCH_VERSION=2.13.0
case "$TARGET" in cpu|gpu) ;; *) echo "usage: PYTHON=... $0 [cpu|gpu] [--cluster]" >&2; exit 2 ;; esac
case "$CLUSTER" in ""|--cluster) ;; *) echo "usage: PYTHON=... $0 [cpu|gpu] [--cluster]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
TORCH_INDEX=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then TORCH_INDEX=(--index-url "$TORCH_INDEX_URL"); fi

"$PY" -m pip install --quiet --upgrade pip
# torch first, from the chosen index, so the package's `torch>=2.3` is already met and never pulls another build.
"$PY" -m pip install --quiet ${TORCH_INDEX[@]+"${TORCH_INDEX[@]}"} "torch==$TORCH_VERSION"
"$PY" -m pip install --quiet -e ".[demo,test]"
if [ "$TARGET" = gpu ]; then
  # faiss-cpu (a dependency) and faiss-gpu-cu12 install the same `faiss` module: remove the CPU one first, or it
  # would overwrite (or, removed later, delete) the GPU build's files.
  "$PY" -m pip uninstall --quiet --yes faiss-cpu
  "$PY" -m pip install --quiet faiss-gpu-cu12
fi
if [ "$CLUSTER" = --cluster ]; then
  RAY_VERSION=$("$PY" -c 'import ray; print(ray.__version__)')
  "$PY" -m pip install --quiet "ray[default,data]==$RAY_VERSION"
fi
"$PY" -c 'import faiss, pipeline.cli, ray, torch; print("hardneg installed: torch", torch.__version__, "ray", ray.__version__, "faiss", faiss.__version__)'
