# The two commands: `make run` and `make test`. Everything else is what they need.
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= etc/twisted-novnc.ini
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

# A regular (not editable) install: it is the one that puts
# twisted/plugins/twisted_novnc_plugin.py where twistd finds it.
SOURCES := setup.cfg pyproject.toml $(wildcard twisted_novnc/*.py twisted_novnc/*/*.py) twisted/plugins/twisted_novnc_plugin.py

.PHONY: run test test-fast lint venv browser-deps clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

$(VENV)/.installed: $(VENV)/bin/activate $(SOURCES)
	$(PY) -m pip install --quiet '.[test]'
	touch $@

venv: $(VENV)/.installed

# tests/browser: the real noVNC client and playwright-core, exactly as locked.  Without npm
# (a developer's machine) the browser tests skip and say why; under CI that is an error.
BROWSER_DIR := tests/browser
$(BROWSER_DIR)/node_modules/.installed: $(BROWSER_DIR)/package.json $(BROWSER_DIR)/package-lock.json
	@if command -v npm >/dev/null; then \
	    cd $(BROWSER_DIR) && npm ci --no-audit --no-fund && touch node_modules/.installed; \
	elif [ -n "$$CI" ]; then \
	    echo "npm is missing: the browser tests cannot run" >&2; exit 1; \
	else \
	    echo "npm not found: tests/browser will be skipped" >&2; \
	fi

browser-deps: $(BROWSER_DIR)/node_modules/.installed

# ARGS: extra options, e.g. ARGS='--set upstream.allowed_networks=127.0.0.1/32'
run: venv
	$(VENV)/bin/twistd --pidfile= -n novnc --config $(CONFIG) $(ARGS)

test: venv browser-deps
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not integration and not e2e" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check twisted_novnc tests twisted
	$(VENV)/bin/mypy twisted_novnc

# The benchmark (bench/README.md): BENCH_ARGS=--quick for a smoke run.
BENCH_ARGS ?=
.PHONY: bench
bench: venv
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
