#!/usr/bin/env bash
# configs/vlm2vec.yaml against VLM2Vec's own code, run unmodified under its pinned transformers (4.52.3) beside ours.
#
#   tests/compat/vlm2vec_reference.sh /path/to/VLM2Vec-clone [WORKDIR]
#
# Makes a venv (VLM2VEC_VENV, default /tmp/hardneg-vlm2vec-reference) with transformers 4.52.3 (every other package
# from the project's environment), builds a tiny random Qwen2-VL checkpoint with VLM2Vec's vendored classes and
# encodes four items its way, then with configs/vlm2vec.yaml in the project's venv, and prints the cosines
# (tests/compat/vlm2vec_reference.py). Needs the package registry once.
set -euo pipefail
SRC=$(cd "$1" && pwd)
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
WORK=${2:-$(mktemp -d)}
VENV=${VLM2VEC_VENV:-/tmp/hardneg-vlm2vec-reference}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$PY" -c "import site, sys; print('import site; ' + '; '.join(f'site.addsitedir({p!r})' for p in sys.path if p.endswith('site-packages')))" \
    > "$VENV/lib/python$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages/zz_project.pth"
  "$VENV/bin/python" -m pip install -q "transformers==4.52.3"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/python" tests/compat/vlm2vec_reference.py reference "$WORK" "$SRC"
exec "$PY" tests/compat/vlm2vec_reference.py compare "$WORK"
