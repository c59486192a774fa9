#!/usr/bin/env bash
# `kind: qqmm` against QQMM-embed's own code, run unmodified under its pinned transformers (4.44.2) beside ours.
#
#   tests/compat/qqmm_reference.sh /path/to/QQMM-embed-clone [WORKDIR]
#
# Makes a venv (QQMM_VENV, default /tmp/hardneg-qqmm-reference) with transformers 4.44.2 (every other package from
# the project's environment), saves a tiny random QQMM checkpoint, embeds four items with QQMM's EmbedBot, then
# with `kind: qqmm` in the project's venv, and prints the cosines (tests/compat/qqmm_reference.py). Needs the
# package registry once.
set -euo pipefail
SRC=$(cd "$1" && pwd)
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
WORK=${2:-$(mktemp -d)}
VENV=${QQMM_VENV:-/tmp/hardneg-qqmm-reference}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$PY" -c "import site, sys; print('import site; ' + '; '.join(f'site.addsitedir({p!r})' for p in sys.path if p.endswith('site-packages')))" \
    > "$VENV/lib/python$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages/zz_project.pth"
  "$VENV/bin/python" -m pip install -q "transformers==4.44.2"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/python" tests/compat/qqmm_reference.py reference "$WORK" "$SRC"
exec "$PY" tests/compat/qqmm_reference.py compare "$WORK"
