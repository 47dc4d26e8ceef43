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

# Re-installs only when the lock file, pyproject or the C resize kernel (setup.py builds it in place) changes.
# pip is upgraded first: the machine's old pip backtracks for many minutes on this dependency set.
$(STAMP): requirements.lock pyproject.toml setup.py slicefm/preprocess/_bilinear.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: setup  ## fast test suite (the CI command)
	$(PY) -m pytest -q -m "not slow" tests

test-all: setup  ## every test, slow ones included
	$(PY) -m pytest -q tests

gpu-check: setup  ## issue-15 GPU check (lesion location pretrained vs random at 224 px, ViT-B MFU); SMOKE=1 on CPU
	benchmarks/gpu_check.sh $(if $(SMOKE),--smoke)

lint: setup  ## ruff
	$(VENV)/bin/ruff check slicefm components pipelines tests benchmarks

compile: setup  ## write the pipeline YAML (pipelines/slicefm_pipeline.yaml)
	$(PY) -m slicefm pipeline compile --out pipelines/slicefm_pipeline.yaml

# Local (kfp.local SubprocessRunner) by default; with KFP_HOST set, `slicefm pipeline submit`: compile, upload the
# pipeline version named by the git commit (reused when it exists) and start a run under $KFP_SERVICE_ACCOUNT.
run-pipeline: setup  ## run the whole pipeline (local, or on KFP_HOST)
	@if [ -n "$$KFP_HOST" ]; then \
	  $(PY) -m slicefm pipeline submit --host "$$KFP_HOST" --config $${CONFIG:-pipelines/configs/demo-cpu.yaml}; \
	else \
	  $(PY) -m slicefm key init --if-missing && \
	  $(PY) -m slicefm pipeline run --runner $(RUNNER) --config $${CONFIG:-pipelines/configs/demo-cpu.yaml}; \
	fi

submit: setup  ## compile, upload a pipeline version named by the git commit, start a run on KFP_HOST
	$(PY) -m slicefm pipeline submit --host "$$KFP_HOST" --config $${CONFIG:-pipelines/configs/demo-cpu.yaml}

data: setup  ## (re)generate the demo phantom dataset in data/ (what data.dvc tracks)
	$(PY) -m slicefm data demo --config pipelines/configs/demo-cpu.yaml --force

clean-local:  ## remove local runs, MLflow db and kfp outputs (keeps .venv and data/)
	rm -rf .slicefm

# -- container images ----------------------------------------------------------------------------------
# `make images` builds $(IMAGE_REGISTRY)/slicefm:$(VERSION) and :$(VERSION)-$(TAG) on this machine without a
# registry (docker/build-images.sh: Docker Engine, base image, wheelhouse, dependency image, sources). One
# image for CPU and GPU nodes (the lock's torch is the CUDA build; it runs on CPU when no GPU is visible).
# TAG defaults to the git short commit (+ "-dirty" with uncommitted tracked changes). Point the pipeline at a
# pushed image with SLICEFM_IMAGE=<registry>/slicefm:<version>-<tag> when compiling/submitting.
RUNNER ?= subprocess
IMAGE_REGISTRY ?=
GIT_COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
TAG ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)$(shell git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo -dirty)
# From pyproject.toml (not the environment, where VERSION often means something else).
VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE = $(if $(IMAGE_REGISTRY),$(IMAGE_REGISTRY)/)slicefm

.PHONY: images push-images data-push data-pull

images: setup  ## build the project image <IMAGE_REGISTRY>/slicefm:<VERSION>[-<TAG>] (no registry needed)
	VERSION=$(VERSION) GIT_COMMIT=$(GIT_COMMIT) TAG=$(TAG) IMAGE_REGISTRY=$(IMAGE_REGISTRY) PYTHON=$(PY) \
	  docker/build-images.sh

# Checked when the Makefile is read, so nothing is built before the missing registry is reported.
ifneq ($(filter push-images,$(MAKECMDGOALS)),)
ifeq ($(IMAGE_REGISTRY),)
$(error push-images needs IMAGE_REGISTRY, e.g. make push-images IMAGE_REGISTRY=registry.example.org/team)
endif
endif

push-images: images  ## build and push the image to IMAGE_REGISTRY
	export DOCKER_HOST=$$(docker/engine.sh start) && docker push $(IMAGE):$(VERSION)-$(TAG) && docker push $(IMAGE):$(VERSION)
	@echo "pipeline image: SLICEFM_IMAGE=$(IMAGE):$(VERSION)-$(TAG)"

# -- data (DVC) ----------------------------------------------------------------------------------------
# The remote is DVC_REMOTE when set, else the default remote in .dvc/config (`dvc remote add -d NAME
# s3://bucket/prefix`; `dvc remote modify NAME endpointurl URL` for non-AWS S3). Credentials come from the
# AWS_* variables or `dvc remote modify --local`, never from files in git.
DVC := $(VENV)/bin/dvc
DVC_REMOTE ?=
DVC_REMOTE_ARG = $(if $(DVC_REMOTE),--remote $(DVC_REMOTE))

data-push: setup  ## upload data/ (the revision in data.dvc) to the DVC remote (DVC_REMOTE or the default)
	$(DVC) push $(DVC_REMOTE_ARG) data.dvc

data-pull: setup  ## download data/ as recorded in data.dvc from the DVC remote (DVC_REMOTE or the default)
	$(DVC) pull $(DVC_REMOTE_ARG) data.dvc
