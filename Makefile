# Two commands do all set-up on a fresh machine:
#   make demo   -> virtual environment + install + `probekit demo`
#   make test   -> virtual environment + install + Chromium (for the browser test) + the test suite
# and `make docs` builds the docs site into build/docs/html.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The real-browser test drives Debian's Chromium (Playwright cannot download browsers here).
CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test chromium docs

$(BIN)/.probekit-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.probekit-installed
	$(BIN)/probekit demo

# Installs Chromium through apt when it is missing; where that cannot be done (not root,
# no apt, apt fails) it says so in one line and fails.
chromium:
	@test -x $(CHROMIUM) || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq >/dev/null 2>&1 \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
	  && test -x $(CHROMIUM); \
	} || { echo "make test needs Chromium at $(CHROMIUM) for tests/test_browser.py and could not install it; run: sudo apt-get install -y chromium (or set CHROMIUM=/path/to/chromium)" >&2; exit 1; }

test: $(BIN)/.probekit-installed chromium
	PROBEKIT_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest -q

# The docs site, from docs/ (guides), notebooks/ (not run) and the docstrings; offline, warnings are
# errors as in tests/test_docs.py. Open build/docs/html/index.html.
docs: $(BIN)/.probekit-installed
	$(BIN)/python -m sphinx -W --keep-going -b html docs build/docs/html
