# Entry points on a fresh machine: `make demo`, `make test` and `make test-vllm`. All build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-vllm lint install

$(STAMP): pyproject.toml clients/python/pyproject.toml integrations/vllm/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	# The admin client: the `convstate admin` command uses it, and the tests drive a live service with it.
	$(BIN)/pip install --quiet -e clients/python
	# The vLLM plugin (its own distribution), without vLLM: its digest is tested against the service's
	# here; the rest of it runs in the vLLM lane.
	$(BIN)/pip install --quiet -e integrations/vllm
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/convstate demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

# The tests marked `vllm`, against a real vLLM on CPU; its environment and model are cached outside .venv.
test-vllm: $(STAMP)
	PYTHON=$(PYTHON) bash tests/vllm/lane.sh run
