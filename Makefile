# One command to set up and test, from a fresh clone: `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test lint setup serve bench-train bench-serve clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q

# Serves SEGMENT_CHECKPOINT (default models/camvid.safetensors) on http://127.0.0.1:8000
serve: setup
	$(PY) -m service

# Needs ../shared/camvid (or DATA=...) and fastai: not part of the tests.
DATA ?= ../shared/camvid
bench-train: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/train.py --data $(DATA)

bench-serve: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/serve.py --data $(DATA)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
