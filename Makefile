# One entry point for people, pre-commit and CI. `make test` sets everything up and runs it all.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

COMPOSE := $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

.PHONY: install run test lint format bench clean docker compose browser-deps

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# The product's main job on a machine without Docker (see README).
run: install
	$(BIN)/fedunroll simulate

# Style, types and the architecture's import contracts ([tool.importlinter] in pyproject.toml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Headless Chromium + chromedriver (Debian's packages) for the browser tests of the dashboard;
# installed only where missing. Without apt-get (or root/sudo) it says so and those tests skip.
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif ! command -v apt-get >/dev/null; then \
		echo "browser-deps: no apt-get here: install chromium and chromedriver for the browser tests"; \
	else \
		sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium chromium-driver; \
	fi

test: install lint browser-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_modl.py --out benchmarks/results/modl.json

# Docker engine (started if none answers), Debian base image, offline wheelhouse, project image.
docker: install
	bash deploy/ci-docker.sh

# The multi-site federation of docker-compose.yml, to completion.
compose:
	$(COMPOSE) up --exit-code-from run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
