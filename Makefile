# seed-lightning: every target creates the virtualenv and the default data on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SEED := $(VENV)/bin/seed-lightning
DATA := data/synthetic
MODELS := data/models
TOKENIZER_RUN := checkpoints/tokenizer-tiny
TOKENIZER := $(TOKENIZER_RUN)/seed_tokenizer
PYTEST_ARGS ?=

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

$(VENV)/.installed: requirements.txt setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

venv: $(VENV)/.installed  ## create the virtualenv with the pinned dependencies

java:  ## make sure Java (for the caption metrics) is installed
	@command -v java >/dev/null || { echo "Java missing: installing default-jre-headless"; \
	  (apt-get update -qq && apt-get install -y -qq default-jre-headless >/dev/null) || \
	  echo "WARNING: could not install Java; caption metrics (pycocoevalcap) will be unavailable"; }

$(DATA)/.complete: | $(VENV)/.installed
	$(PY) -m seed_lightning.data.synthetic --out $(DATA)
	@touch $@

$(MODELS)/.complete: $(DATA)/.complete
	$(PY) -m seed_lightning.tiny_models --corpus $(DATA)/corpus.txt --out $(MODELS)
	@touch $@

data: $(MODELS)/.complete  ## build the synthetic data set and the tiny local base models

train-tokenizer: data  ## train the tiny SEED tokenizer (stage 1 then stage 2) on the default data
	$(SEED) tokenizer fit --config conf/tokenizer/tiny.yaml --ckpt_path last
	$(SEED) tokenizer fit --config conf/tokenizer/tiny.yaml --config conf/tokenizer/tiny-codebook.yaml --ckpt_path last
	@echo; echo "Tokenizer saved to $(TOKENIZER)"; \
	 echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $(TOKENIZER_RUN)"

test: data java  ## run the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: data  ## run the tests not marked slow
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:  ## remove run outputs (keeps the virtualenv and data)
	rm -rf checkpoints/*/ lightning_logs

.PHONY: help venv java data train-tokenizer test test-fast clean
