# Fresh-machine entry points: `make demo` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Extra pip arguments for the torch install, e.g. TORCH_PIP_ARGS=--index-url=https://download.pytorch.org/whl/cpu
TORCH_PIP_ARGS ?=

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned torch first, from where pip finds its CPU build (TORCH_PIP_ARGS, README): a bare
	# `torch` requirement would pull the CUDA build.
	$(PY) -m pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	touch $@

# `pbp-fx train` needs only the train extra; the tests also need the dev extra (hf, lightning).
$(VENV)/.demo: $(VENV)/.base
	$(PY) -m pip install -q -e '.[ort,train]'
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(PY) -m pip install -q -e '.[ort,dev]'
	touch $@

ZOO_VENV := .venv-zoo
ZOO_PY := $(ZOO_VENV)/bin/python

# torchvision / timm need a torch whose wheel they match (the CPU 2.13 wheel has no torchvision ops).
$(ZOO_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(ZOO_VENV)
	$(ZOO_PY) -m pip install -q --upgrade pip
	$(ZOO_PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 timm
	$(ZOO_PY) -m pip install -q -e '.[ort,dev,hf]'
	touch $@

.PHONY: setup demo test bench zoo
setup: $(VENV)/.installed

demo: $(VENV)/.demo
	# One CPU thread, as compare trains its controls: the pairing below is then step for step.
	OMP_NUM_THREADS=1 $(VENV)/bin/pbp-fx train --out runs/demo --max-dendrites 2 --patience 15
	# The control: plain and restarts arms with the run's own budget and seed, beside its PB result.
	$(VENV)/bin/pbp-fx compare --pb-run runs/demo --jobs 2

test: setup
	$(PY) -m pytest -q -n 2 tests

# The model zoo (torchvision, timm, Hugging Face; slow): one `ZOO|` row per model.
zoo: $(ZOO_VENV)/.installed
	$(ZOO_PY) -m pytest -m zoo -s -q tests/test_zoo.py

bench: setup
	$(PY) bench/perforate_time.py
	$(PY) bench/train_overhead.py
	$(PY) bench/latency.py
	$(PY) bench/accuracy.py
