# `make demo` and `make test` do all the set-up on a fresh machine (a virtualenv in .venv) and then run.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export RAY_AUTH_MODE := disabled

$(VENV)/.installed: pyproject.toml docker/install.sh
	python3 -m venv $(VENV)
	PYTHON=$(PY) bash docker/install.sh cpu
	touch $@

# Debian's Chromium for the inspector's browser tests (Playwright drives it; no browser download).
$(VENV)/.browser: tests/browser_setup.sh $(VENV)/.installed
	PYTHON=$(PY) bash tests/browser_setup.sh
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/hardneg mine --config configs/demo.yaml --out out/demo

test: install $(VENV)/.browser
	$(PY) -m pytest -q

.PHONY: install demo test
