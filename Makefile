# The two commands of the README. Both create .venv with pip when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint prefect plots
# dvc.yaml's commands call `python`: the venv's bin goes first on PATH.
run: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro
	$(PY) -m pipeline.report.summary metrics/evaluate.json

test: $(STAMP)
	$(PY) -m pytest

# The local Prefect server and UI, started so that it stays up offline (see pipeline/orchestration/server.py).
prefect: $(STAMP)
	$(PY) -m pipeline.orchestration.server --port 4200

# `dvc plots show` rendered offline: vega, vega-lite and vega-embed come from npm (versions locked in
# pipeline/report/vega/) and are inlined into the page, which DVC otherwise points at a CDN. Needs npm once.
VEGA ?= .vega
VEGA_TEMPLATE := $(VEGA)/dvc_plots.html
PLOTS_OUT ?= dvc_plots
# REVS="HEAD no-rectify": the same charts for several commits or experiments (dvc plots diff).
REVS ?=
plots: $(VEGA_TEMPLATE)
	$(VENV)/bin/dvc plots $(if $(REVS),diff $(REVS),show) --html-template $(VEGA_TEMPLATE) -o $(PLOTS_OUT)

$(VEGA_TEMPLATE): $(STAMP) pipeline/report/vega/package-lock.json pipeline/report/offline_html.py
	@command -v npm >/dev/null || { echo "make plots needs npm (Debian: apt-get install npm)"; exit 1; }
	mkdir -p $(VEGA)
	cp pipeline/report/vega/package.json pipeline/report/vega/package-lock.json $(VEGA)/
	npm ci --prefix $(VEGA) --no-audit --no-fund --loglevel=error
	$(PY) -m pipeline.report.offline_html --node-modules $(VEGA)/node_modules --out $@

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline stages tests bench
	$(VENV)/bin/ruff format --check pipeline stages tests bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)
