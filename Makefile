# One command to set up and test, from a fresh clone: `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test lint setup tools docs serve bench-train bench-serve bench-runtimes bench-ceiling gpu-wheels gpu-check \
	gpu-data gpu-sweep clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Tools whose pins clash with the project's, each in a venv of its own: checkov (the `checks` extra).
TOOLS ?= .tools
$(TOOLS)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS)/bin/python -m pip install --quiet $$($(TOOLS)/bin/python -c "import tomllib; \
		print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['checks']))")
	touch $@

tools: $(TOOLS)/.installed

lint: setup
	$(PY) -m ruff check .

test: lint tools
	$(PY) -m pytest -q

# docs/configuration.md, from the Settings and TrainConfig fields (a test fails when it is stale)
docs: setup
	$(PY) docs/make_configuration.py

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

bench-runtimes: setup
	$(PY) bench/runtimes.py --data $(DATA)

# The serving path without HTTP against the bare forward, in one process: the ceiling of bench-serve's ratio.
bench-ceiling: setup
	$(PY) bench/ceiling.py --data $(DATA)

# GPU hosts come with their own Python and torch (often another torch build) and often no package registry.
# `make gpu-wheels` (where PyPI is reachable) fetches the packages the service and the tests need beyond what such a
# host has (pure Python, plus imagecodecs and httptools, so uploads are decoded and HTTP parsed as on any host;
# 30 MB in all), at this project's pinned versions, for GPU_PY (the host's Python version);
# `make gpu-check` (on the GPU host, with those wheels copied along) installs them into a side folder, never
# touching torch, and runs bench/gpu_check.py: the CUDA tests, the serving benchmark and a short training run.
GPU_PYTHON ?= python3
GPU_PY ?= 3.12
GPU_WHEELS ?= .gpu-wheels
GPU_SITE ?= /tmp/camvid-gpu-site
GPU_PACKAGES := fastapi starlette uvicorn pydantic pydantic-core pydantic-settings python-dotenv typing-inspection \
	annotated-types python-multipart fastapi-offline imagecodecs httptools
space := $(subst ,, )
GPU_PATTERN := $(subst -,[-_],$(subst $(space),|,$(strip $(GPU_PACKAGES))))
GPU_PLATFORMS := $(foreach n,28 27 17,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64

gpu-wheels: setup
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PY) --implementation cp \
		$(GPU_PLATFORMS) -d $(GPU_WHEELS) $$($(PY) -m pip freeze | grep -iE '^($(GPU_PATTERN))==')
	@ls $(GPU_WHEELS)

gpu-check:
	$(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) \
		$(GPU_WHEELS)/*.whl
	PYTHONPATH=$(GPU_SITE):$(CURDIR) $(GPU_PYTHON) bench/gpu_check.py --data $(DATA)

# Recipes compared on the held-out drive 0006R0 (issue 21's protocol), several at once: a GPU host runs in minutes
# what takes one to two hours a run on 2 CPU cores. `make gpu-data` (here) packs CamVid (frames as JPEG, labels exact) and the
# Lite0 ImageNet encoder weights into .gpu-data/ (about 40 MiB: with the 14 MiB working tree, inside the 64 MiB a
# device call carries); `make gpu-sweep` (on the GPU host, .gpu-data/ copied along) trains bench/sweep_recipes.txt's
# recipes SWEEP_PARALLEL at a time, stops what still runs after SWEEP_DEADLINE seconds, and writes the table to
# SWEEP_OUT/sweep.md.
SWEEP_OUT ?= runs/sweep
SWEEP_PARALLEL ?= 3
SWEEP_DEADLINE ?= 480
gpu-data: setup
	$(PY) bench/gpu_data.py --data $(DATA) --out .gpu-data

gpu-sweep:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) bench/sweep.py --data .gpu-data/camvid --out $(SWEEP_OUT) \
		--parallel $(SWEEP_PARALLEL) --deadline-s $(SWEEP_DEADLINE) \
		--common "--encoder-weights .gpu-data/weights/tf_efficientnet_lite0.safetensors"

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache *.egg-info
