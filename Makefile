# The two commands: `make run` and `make test`. Everything else is what they need.
PYTHON ?= python3
CONFIG ?= etc/twisted-novnc.ini
PYTEST_ARGS ?=

# One virtualenv per use, each holding exactly one lock of requirements/ (every file
# hash-checked) plus the project itself:
#   .venv         the test set (requirements/test.txt): make test, lint, bench, the e2e tests
#   .venv-run     the runtime set (requirements/runtime.txt): the daemon of make run, and nothing
#                 it does not need (no pytest, mypy or websockify)
#   .venv-lowest  the floors of setup.cfg's ranges (requirements/lowest.txt): make test-lowest
#   .venv-tools   pip-tools (requirements/tools.txt), which writes the locks: make lock
#   .venv-build   setuptools and wheel (requirements/build.txt, from pyproject.toml's
#                 build-system): make wheel, as the Containerfile builds it
VENV ?= .venv
RUN_VENV ?= .venv-run
LOWEST_VENV ?= .venv-lowest
TOOLS_VENV ?= .venv-tools
BUILD_VENV ?= .venv-build
PY := $(VENV)/bin/python

# The project goes in as a regular (not editable) install: it is the one that puts
# twisted/plugins/twisted_novnc_plugin.py where twistd finds it.  --no-deps: its dependencies
# are the lock's, already there.
# The package data too (the viewer page, the player, the vendored noVNC): a changed page
# reinstalls like a changed module.
SOURCES := setup.cfg pyproject.toml $(wildcard twisted_novnc/*.py twisted_novnc/*/*.py) twisted/plugins/twisted_novnc_plugin.py \
	$(shell find twisted_novnc/viewer twisted_novnc/recording/player -type f -not -name '*.pyc')

.PHONY: run demo docs test test-fast test-lowest lint venv run-venv lowest-venv browser-deps lock lock-tools clean \
	wheel

# $(call fresh-venv,DIR,LOCK): DIR made anew, holding exactly what LOCK pins.  A changed lock
# rebuilds the venv, so nothing an older lock brought stays behind.  --require-hashes: pip
# refuses any file whose hash the lock does not list, and any package the lock does not pin.
define fresh-venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --require-hashes -r $(2)
endef

# $(call install-project,DIR): the checkout into DIR.  setuptools builds in ./build and keeps
# what an earlier build left there, so a module since removed or moved would be installed
# again from it: it goes first.
define install-project
	rm -rf build
	$(1)/bin/python -m pip install --quiet --no-deps .
endef

$(VENV)/.locked: requirements/test.txt
	$(call fresh-venv,$(VENV),$<)
	touch $@

$(VENV)/.installed: $(VENV)/.locked $(SOURCES)
	$(call install-project,$(VENV))
	touch $@

$(RUN_VENV)/.locked: requirements/runtime.txt
	$(call fresh-venv,$(RUN_VENV),$<)
	touch $@

$(RUN_VENV)/.installed: $(RUN_VENV)/.locked $(SOURCES)
	$(call install-project,$(RUN_VENV))
	touch $@

$(LOWEST_VENV)/.locked: requirements/lowest.txt
	$(call fresh-venv,$(LOWEST_VENV),$<)
	touch $@

$(LOWEST_VENV)/.installed: $(LOWEST_VENV)/.locked $(SOURCES)
	$(call install-project,$(LOWEST_VENV))
	touch $@

$(TOOLS_VENV)/.locked: requirements/tools.txt
	$(call fresh-venv,$(TOOLS_VENV),$<)
	touch $@

$(BUILD_VENV)/.locked: requirements/build.txt
	$(call fresh-venv,$(BUILD_VENV),$<)
	touch $@

venv: $(VENV)/.installed
run-venv: $(RUN_VENV)/.installed
lowest-venv: $(LOWEST_VENV)/.installed

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

# dist/twisted_novnc-<version>-py3-none-any.whl, built with the locked build backend only
# (--no-build-isolation: nothing fetched at build time).  Install it in a venv of its own:
#   pip install --require-hashes -r requirements/runtime.txt && pip install --no-deps dist/*.whl
wheel: $(BUILD_VENV)/.locked
	rm -rf build dist
	$(BUILD_VENV)/bin/python -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir dist .

# ARGS: extra options, e.g.
#   ARGS='--set upstream.allowed_networks=127.0.0.1/32 --set upstream.allow_self=on'
run: run-venv
	@if command -v Xvnc >/dev/null; then \
	    echo "make run: Xvnc is installed: make demo shows a desktop in the browser"; fi
	$(RUN_VENV)/bin/twistd --pidfile= -n novnc --config $(CONFIG) $(ARGS)

# A local desktop (Xvnc on 127.0.0.1), the daemon and a session pointing at the desktop; prints
# http://127.0.0.1:<port>/vnc/<session_id>.  Ctrl-C stops all three.  ARGS go to the daemon.
demo: run-venv
	$(RUN_VENV)/bin/python -m twisted_novnc.demo --config $(CONFIG) $(ARGS)

# The manual (docs/), warnings as errors; tests/test_docs.py builds it the same way.
DOCS_BUILD ?= docs/_build/html
docs: venv
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs $(DOCS_BUILD)

test: venv browser-deps
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not integration and not e2e" $(PYTEST_ARGS)

# The whole suite against the oldest releases setup.cfg admits (README, "Dependencies").
test-lowest: lowest-venv browser-deps
	$(LOWEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check twisted_novnc tests twisted requirements
	$(VENV)/bin/mypy twisted_novnc

# The benchmark (bench/README.md): BENCH_ARGS=--quick for a smoke run.
BENCH_ARGS ?=
.PHONY: bench
bench: venv
	$(PY) bench/run.py $(BENCH_ARGS)

# make lock: every lock of requirements/ re-resolved from setup.cfg's ranges, each package at
# the newest release they admit.  LOCK_UPGRADE='--upgrade-package twisted' moves only that
# package (and what it needs) and keeps every other pin; LOCK_UPGRADE= moves nothing that still
# fits.  The locks come from the package index alone: the machine's pip configuration (mirrors,
# find-links, constraints) is left out, so every hash is that of the file the index serves.
LOCK_UPGRADE ?= --upgrade
PIP_COMPILE = env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT \
	PIP_CONFIG_FILE=/dev/null CUSTOM_COMPILE_COMMAND="make $@" \
	$(TOOLS_VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	--no-emit-index-url --no-emit-find-links

lock: $(TOOLS_VENV)/.locked
	$(PIP_COMPILE) $(LOCK_UPGRADE) -o requirements/runtime.txt setup.cfg
	$(PIP_COMPILE) $(LOCK_UPGRADE) --extra test -c requirements/runtime.txt \
	    -o requirements/test.txt setup.cfg
	$(TOOLS_VENV)/bin/python requirements/floors.py setup.cfg requirements/test.txt \
	    > requirements/lowest.in
	$(PIP_COMPILE) $(LOCK_UPGRADE) -o requirements/lowest.txt requirements/lowest.in
	$(PIP_COMPILE) $(LOCK_UPGRADE) --build-deps-for wheel --only-build-deps \
	    -o requirements/build.txt pyproject.toml

# The lock tool's own lock: after changing the pin in requirements/tools.in.
lock-tools: $(TOOLS_VENV)/.locked
	$(PIP_COMPILE) -o requirements/tools.txt requirements/tools.in

clean:
	rm -rf $(VENV) $(RUN_VENV) $(LOWEST_VENV) $(TOOLS_VENV) $(BUILD_VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache \
	    docs/_build
