# Two commands a newcomer needs: `make demo` (the main job) and `make test`.
# Each creates .venv if absent and installs what the project needs into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,zoo,dev
STAMP := $(VENV)/.moerge-installed

.PHONY: setup test lint demo bench-merge clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	# PyPI's torchvision/torchaudio/torchcodec break transformers imports next to the CPU torch build.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	$(VENV)/bin/moerge demo

bench-merge: $(STAMP)
	$(PY) bench/merge_bench.py

clean:
	rm -rf $(VENV) .cache runs
