# Two commands from a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test install clean chromium prometheus lint typecheck

install: $(STAMP)

# torch first, pinned: this machine's local CPU wheel; a looser pin pulls GBs of CUDA packages.
# The checkout is the `privads` package (pyproject.toml: package-dir), installed editable with the bench and
# test extras. Not --no-compile: with PYTHONDONTWRITEBYTECODE set (as on this machine) nothing would ever write
# the .pyc files, and every process the tests start would compile what it imports again.
$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[bench,test]'
	@touch $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 exec $(VENV)/bin/privads up

# the dashboard's test renders it in Debian's headless Chromium (installed once, if missing)
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null)

# the alert rules' test runs Debian's Prometheus and promtool (installed once, if missing)
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

# style (ruff) and the import layers of docs/architecture.md (.importlinter)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# mypy sees the package by its installed name through a link (the editable install is an import hook it cannot
# follow): build/typecheck/privads → the checkout
typecheck: $(STAMP)
	@mkdir -p build/typecheck && ln -sfn ../.. build/typecheck/privads
	MYPYPATH=build/typecheck $(VENV)/bin/mypy -p privads

test: lint typecheck chromium prometheus
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) .privads .pytest_cache *.egg-info build
