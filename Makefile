# Fresh-machine entry points: `make demo` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU wheel first: a bare `torch` requirement would pull the CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[ort,dev,hf]'
	touch $@

.PHONY: setup demo test bench
setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/pbp-fx train --out runs/demo --max-dendrites 2 --patience 15
	# The control: plain and restarts arms with the run's own budget and seed, beside its PB result.
	$(VENV)/bin/pbp-fx compare --pb-run runs/demo --jobs 2

test: setup
	$(PY) -m pytest -q -n 2 tests

bench: setup
	$(PY) bench/perforate_time.py
	$(PY) bench/train_overhead.py
	$(PY) bench/latency.py
	$(PY) bench/accuracy.py
