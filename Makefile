# veilstream: `make test` and `make demo` install what they need into .venv;
# downloads are cached outside the repository (pip's cache and $(CACHE)).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/veilstream
export VEILSTREAM_CACHE := $(CACHE)
export VEILSTREAM_MEDIA := $(CACHE)/media
export YOLO_OFFLINE := 1
export YOLO_AUTOINSTALL := 0
export YOLO_CONFIG_DIR := $(CACHE)/ultralytics
export MPLBACKEND := Agg

.PHONY: setup media kafka-jars lint test test-fast demo bench eval clean

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) bash scripts/setup.sh
	touch $@

setup: $(VENV)/.installed media kafka-jars

kafka-jars: $(VENV)/.installed
	$(PY) -m tests.support.brokers fetch

media: $(VENV)/.installed
	PYTHON=$(PY) bash scripts/fetch-media.sh

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

test: setup lint
	$(VENV)/bin/pytest

test-fast: setup
	$(VENV)/bin/pytest -m "not slow and not kafka"

demo: setup
	$(VENV)/bin/veilstream demo --out out

eval: setup
	$(VENV)/bin/veilstream --config config/paper.yaml eval $(VEILSTREAM_MEDIA) --region salient --size 50 \
		--video-step 10 --stop float,published --report reports/eval

# About an hour on 2 cores; each prints a table and writes bench/results/*.json.
bench: setup
	$(PY) bench/correction.py
	$(PY) bench/steps.py
	$(PY) bench/pipeline.py
	$(PY) bench/worker.py

clean:
	rm -rf $(VENV) out reports .mypy_cache .ruff_cache .pytest_cache
