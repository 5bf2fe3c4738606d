# weightsmith developer targets. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch is installed first; a user with a GPU overrides it, e.g.
#   make TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124' demo
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: venv demo test test-slow bench bench-quantize bench-merge bench-prune bench-gguf peers clean

$(BIN)/weightsmith: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev,packed]'
	touch $@

venv: $(BIN)/weightsmith

demo: venv
	$(BIN)/weightsmith demo

test: venv
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The slow tests reuse the default model from the user cache (fetched once by `make demo`).
test-slow: venv
	WEIGHTSMITH_TEST_CACHE=$${XDG_CACHE_HOME:-$$HOME/.cache} $(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

bench: venv
	$(BIN)/python bench/io.py

# Peer tools (mergekit, llm-compressor, GPTQModel, Torch-Pruning) in their own venv, for bench/ only; installed once.
PEERS_STAMP := .venv-peers/bin/mergekit-yaml
$(PEERS_STAMP): bench/setup-peers.sh
	bash bench/setup-peers.sh
	touch $@

peers: $(PEERS_STAMP)

bench-quantize: venv peers
	$(BIN)/python bench/quantize.py

bench-merge: venv peers
	$(BIN)/python bench/merge.py

bench-prune: venv peers
	$(BIN)/pip install --quiet -e '.[plot]'
	$(BIN)/python bench/prune.py

# llama.cpp's tools and Python bindings (from the llama-cpp-python sdist, built once into .peers/ and
# .venv-peers; the script skips what exists), then our GGUF files against llama-quantize's.
bench-gguf: venv
	bash bench/setup-llamacpp.sh
	$(BIN)/python bench/gguf_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
