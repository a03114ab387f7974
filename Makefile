# Set-up and entry points. `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= smollm2-135m-instruct

.PHONY: test demo prepare bench

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

prepare: $(VENV)/.installed
	$(PY) model.py prepare $(MODEL)

test: prepare
	$(PY) -m pytest -q tests

bench: prepare
	$(PY) bench.py
