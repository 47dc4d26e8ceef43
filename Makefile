# slicefm: `make run-pipeline` and `make test` work on a fresh machine as the only commands typed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slicefm-installed
export SLICEFM_HOME ?= $(CURDIR)/.slicefm
# No usage telemetry from MLflow (clusters and CI have no outside network anyway).
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true

.PHONY: setup test test-all lint compile run-pipeline submit data clean-local help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: $(STAMP)  ## idempotent virtualenv in .venv with the pinned dependencies

# Re-installs only when the lock file or pyproject changes. pip is upgraded first: the machine's
# old pip backtracks for many minutes on this dependency set.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: setup  ## fast test suite (the CI command)
	$(PY) -m pytest -q -m "not slow" tests

test-all: setup  ## every test, slow ones included
	$(PY) -m pytest -q tests

lint: setup  ## ruff
	$(VENV)/bin/ruff check slicefm components pipelines tests benchmarks

compile: setup  ## write the pipeline YAML (pipelines/slicefm_pipeline.yaml)
	$(PY) -m slicefm.cli pipeline compile --out pipelines/slicefm_pipeline.yaml

# Local (kfp.local SubprocessRunner) by default; compiles and submits to a cluster when KFP_HOST is set.
run-pipeline: setup  ## run the whole pipeline (local, or on KFP_HOST)
	@if [ -n "$$KFP_HOST" ]; then \
	  $(PY) -m slicefm.cli pipeline submit --host "$$KFP_HOST" --config $${CONFIG:-pipelines/configs/demo-cpu.yaml}; \
	else \
	  $(PY) -m slicefm.cli pipeline run --config $${CONFIG:-pipelines/configs/demo-cpu.yaml}; \
	fi

submit: setup  ## compile + submit to KFP_HOST
	$(PY) -m slicefm.cli pipeline submit --host "$$KFP_HOST" --config $${CONFIG:-pipelines/configs/demo-cpu.yaml}

data: setup  ## (re)generate the demo phantom dataset in data/ (what data.dvc tracks)
	$(PY) -m slicefm.cli data demo --out data

clean-local:  ## remove local runs, MLflow db and kfp outputs (keeps .venv and data/)
	rm -rf .slicefm
