PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# One stamp per install set: `make run` installs the service only, `make test` adds the test tools.
RUN_STAMP := $(VENV)/.installed-server
DEV_STAMP := $(VENV)/.installed-dev
HOST ?= 127.0.0.1
PORT ?= 8080
# The dashboard's browser test drives Debian's chromium (Playwright never downloads one here).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint typecheck bench bench-full clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[server]'
	touch $(RUN_STAMP)

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[server,test,bench]'
	touch $(DEV_STAMP) $(RUN_STAMP)

# Installed once, quietly; the apt log is shown only if it fails.
$(CHROMIUM):
	@echo "installing Debian's chromium for the dashboard's browser test (once)"
	@log=$$(mktemp); \
	{ $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; } >$$log 2>&1 \
	  || { cat $$log; rm -f $$log; exit 1; }; \
	rm -f $$log

run: $(RUN_STAMP)
	$(BIN)/tdx-service serve --host $(HOST) --port $(PORT)

test: $(DEV_STAMP) $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

bench: $(DEV_STAMP)
	$(BIN)/python -m bench --quick

bench-full: $(DEV_STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
