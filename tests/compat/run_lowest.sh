#!/usr/bin/env bash
# The teacher tests under the lowest transformers that pyproject.toml allows (its `transformers>=X` floor).
#
#   tests/compat/run_lowest.sh [pytest args]     # default: the teacher test files
#
# Makes a second venv (LOWEST_VENV, default /tmp/hardneg-transformers-X) holding only transformers==X and what that
# version pins differently (huggingface-hub, tokenizers); every other package, and hardneg itself, comes from the
# project's environment (PYTHON, default .venv/bin/python), which stays untouched. Needs the package registry once.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
LOW=$(sed -n 's/^ *"transformers>=\([0-9.]*\)[,"].*/\1/p' pyproject.toml)
[ -n "$LOW" ] || { echo "no transformers>=X floor in pyproject.toml" >&2; exit 2; }
VENV=${LOWEST_VENV:-/tmp/hardneg-transformers-$LOW}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import transformers, sys; sys.exit(transformers.__version__ != '$LOW' and not transformers.__version__.startswith('$LOW.'))" 2>/dev/null; then
  "$PY" -m venv "$VENV"
  # the project's site-packages (and the .pth files in them) come after the second venv's own
  "$PY" -c "import site, sys; print('import site; ' + '; '.join(f'site.addsitedir({p!r})' for p in sys.path if p.endswith('site-packages')))" \
    > "$VENV/lib/python$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages/zz_project.pth"
  "$VENV/bin/python" -m pip install -q "transformers==$LOW"
fi
"$VENV/bin/python" -c "import transformers, huggingface_hub, tokenizers; print('transformers', transformers.__version__, '| huggingface_hub', huggingface_hub.__version__, '| tokenizers', tokenizers.__version__)"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
if [ $# -eq 0 ]; then
  # sentence-transformers' current releases need transformers 5: its teacher is left to the main environment
  set -- tests/test_teachers_fidelity.py tests/test_teachers_qqmm.py tests/test_teachers_dual_fidelity.py \
    tests/test_teachers_vlm.py tests/test_teachers.py \
    -k "not sentence_transformer"
fi
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
