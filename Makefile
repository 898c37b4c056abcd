# The two set-up commands of the README: `make demo` and `make test`.
# Each creates its own virtual environment (.venv) and installs what it needs from the package registry.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build that installs offline on the project machines; any torch >= 2.3 works.
TORCH ?= torch==2.13.0

.PHONY: demo test test-slow bench lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/gradsketch demo --out gradsketch-out

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(VENV)/bin/gradsketch bench sketches --quick

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/mypy src

clean:
	rm -rf $(VENV) gradsketch-out
