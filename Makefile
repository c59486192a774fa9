# `make demo` and `make test` do all the set-up on a fresh machine (a virtualenv in .venv) and then run.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export RAY_AUTH_MODE := disabled

$(VENV)/.installed: pyproject.toml docker/install.sh
	python3 -m venv $(VENV)
	PYTHON=$(PY) bash docker/install.sh cpu
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/hardneg mine --config configs/demo.yaml --out out/demo

test: install
	$(PY) -m pytest -q

.PHONY: install demo test
