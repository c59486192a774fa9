#!/usr/bin/env bash
# What the inspector's browser tests (tests/test_inspector_e2e.py) need: Debian's Chromium, which Playwright drives
# through executable_path (`playwright install` is never run: it would download a browser build), and the playwright
# Python package. Idempotent. Usage, as root: PYTHON=.venv/bin/python bash tests/browser_setup.sh
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
if [ ! -x /usr/bin/chromium ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi
"$PY" -m pip install --quiet "playwright>=1.45"
