# The two commands: `make run` and `make test`. Everything else is what they need.
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= etc/twisted-novnc.ini
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

# A regular (not editable) install: it is the one that puts
# twisted/plugins/twisted_novnc_plugin.py where twistd finds it.
SOURCES := setup.cfg pyproject.toml $(wildcard twisted_novnc/*.py) twisted/plugins/twisted_novnc_plugin.py

.PHONY: run test test-fast lint venv clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

$(VENV)/.installed: $(VENV)/bin/activate $(SOURCES)
	$(PY) -m pip install --quiet '.[test]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/twistd --pidfile= -n novnc --config $(CONFIG)

test: venv
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
