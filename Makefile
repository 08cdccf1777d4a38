# Two commands do all set-up on a fresh machine:
#   make demo   -> virtual environment + install + `probekit demo`
#   make test   -> virtual environment + install + the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test

$(BIN)/.probekit-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.probekit-installed
	$(BIN)/probekit demo

test: $(BIN)/.probekit-installed
	$(BIN)/python -m pytest -q
