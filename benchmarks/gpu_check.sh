#!/usr/bin/env bash
# The prepared GPU check (issue 15), one command, offline, <= 8 minutes on one GPU; see benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh                  # on a GPU machine -> benchmarks/results/gpu.json
#   benchmarks/gpu_check.sh --cpu            # the same steps on the CPU (CI), no GPU figures
#
# Python: $PYTHON, else the repo's .venv, else python3. Wheels in $WHEELS (default .whl/; e.g. faiss-gpu for a
# machine whose image lacks FAISS) are installed into a temporary folder first, without network access.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
WHEELS=${WHEELS:-.whl}
EXTRA=""
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  EXTRA=$(mktemp -d /tmp/hardneg-gpu-check-site.XXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$EXTRA" "$WHEELS"/*.whl
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
export PYTHONPATH="$PWD${EXTRA:+:$EXTRA}${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" benchmarks/gpu_check.py "$@"
