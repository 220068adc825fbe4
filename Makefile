# The two commands of the README. Both create .venv with pip when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint prefect
# dvc.yaml's commands call `python`: the venv's bin goes first on PATH.
run: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro
	$(PY) -m pipeline.report.summary metrics/evaluate.json

test: $(STAMP)
	$(PY) -m pytest

# The local Prefect server and UI, started so that it stays up offline (see pipeline/orchestration/server.py).
prefect: $(STAMP)
	$(PY) -m pipeline.orchestration.server --port 4200

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline stages tests bench
	$(VENV)/bin/ruff format --check pipeline stages tests bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)
