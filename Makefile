# Two commands set up a fresh machine: `make demo` and `make test`.
# torch is pinned for the venv because the CPU wheel of 2.13.0 is what a fresh
# machine of this kind can install without pulling a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: install demo test lint format
install: $(VENV)/.installed

demo: install
	$(VENV)/bin/moe-compile demo

lint: install
	$(PY) -m ruff check moe_compile tests bench
	$(PY) -m ruff format --check moe_compile tests bench

format: install
	$(PY) -m ruff format moe_compile tests bench
	$(PY) -m ruff check --fix moe_compile tests bench

test: lint
	$(PY) -m pytest -q tests
