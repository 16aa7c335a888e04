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
DECODER := $(MODELS)/tiny-decoder
RUNS := checkpoints/tiny
TOKENIZER := $(RUNS)/seed_tokenizer
TOKENS := $(DATA)/tokens
MLLM_RUN := $(RUNS)/mllm
MLLM_CONFIG := conf/mllm/tiny.yaml
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
	$(PY) -m devkit.synthetic --out $(DATA)
	@touch $@

$(MODELS)/.complete: $(DATA)/.complete
	$(PY) -m devkit.tiny_models --corpus $(DATA)/corpus.txt --out $(MODELS)
	$(PY) -m devkit.tiny_clip --data $(DATA) --out $(MODELS)/tiny-clip
	@touch $@

# Its own target (built once: order-only), so that a data folder made before it existed gains it.
$(DECODER)/decoder/config.json: | $(MODELS)/.complete
	$(PY) -m devkit.tiny_decoder --data $(DATA) --sd $(MODELS)/tiny-sd --out $(DECODER)

data: $(MODELS)/.complete $(DECODER)/decoder/config.json  ## build the synthetic data set and the tiny local models

train-tokenizer: data  ## train the tiny SEED tokenizer (stage 1 then stage 2) on the default data
	$(SEED) tokenizer fit --config conf/tokenizer/tiny.yaml --ckpt_path last
	$(SEED) tokenizer fit --config conf/tokenizer/tiny.yaml --config conf/tokenizer/tiny-codebook.yaml --ckpt_path last
	@echo; echo "Tokenizer saved to $(TOKENIZER)"; \
	 echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $(RUNS)"

$(TOKENIZER)/model.safetensors: | $(MODELS)/.complete
	$(MAKE) train-tokenizer

# Redone when the tokenizer changes (--replace-stale drops tokens of the old one); resumes when interrupted.
$(TOKENS)/.complete: $(TOKENIZER)/model.safetensors
	$(SEED) extract-tokens --tokenizer $(TOKENIZER) --shards '$(DATA)/shards/train-*.tar' --out $(TOKENS) \
	  --prefix train --replace-stale
	$(SEED) extract-tokens --tokenizer $(TOKENIZER) --shards '$(DATA)/shards/val-*.tar' --out $(TOKENS) \
	  --prefix val --replace-stale
	@touch $@

extract-tokens: data $(TOKENS)/.complete  ## encode every image once into token shards (trains the tokenizer if missing)

train-mllm: extract-tokens  ## train the tiny multimodal LM on the token shards (runs train-tokenizer if needed)
	$(SEED) mllm fit --config $(MLLM_CONFIG) --ckpt_path last
	@echo; echo "Multimodal LM saved to $(MLLM_RUN)/export (merged/: plain Hugging Face model; adapter/: LoRA, when used)"; \
	 echo "Try: $(SEED) caption IMAGE   |   $(SEED) vqa IMAGE \"QUESTION\"   |   $(SEED) generate \"CAPTION\" -o out.png --sd $(DECODER)"; \
	 echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $(RUNS)"

eval-tokenizer: data java  ## evaluate a tokenizer checkpoint: make eval-tokenizer CKPT=path.ckpt
	@test -n "$(CKPT)" || { echo "usage: make eval-tokenizer CKPT=checkpoints/tiny/tokenizer-stage2/checkpoints/last.ckpt"; exit 2; }
	$(SEED) tokenizer evaluate --config conf/tokenizer/tiny.yaml --config conf/tokenizer/tiny-codebook.yaml --ckpt_path $(CKPT)

eval-mllm: data java  ## evaluate an MLLM checkpoint: make eval-mllm CKPT=path.ckpt
	@test -n "$(CKPT)" || { echo "usage: make eval-mllm CKPT=$(MLLM_RUN)/checkpoints/last.ckpt"; exit 2; }
	$(SEED) mllm evaluate --config $(MLLM_CONFIG) --ckpt_path $(CKPT)

demo-resume: data  ## SIGKILL a tiny run mid-epoch, resume it, print its losses beside an uninterrupted run's
	$(PY) -m pytest -q -s -p no:cacheprovider tests/e2e/test_demo_resume.py

test: data java  ## run the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: data  ## run the tests not marked slow
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:  ## remove run outputs (keeps the virtualenv and data)
	rm -rf checkpoints/*/ lightning_logs

.PHONY: help venv java data train-tokenizer extract-tokens train-mllm eval-tokenizer eval-mllm demo-resume test test-fast clean
