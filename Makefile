# The two commands of the README. Both create .venv with the system python3 if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: quickstart test lint install install-dev clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# torch/torchvision first and alone, pinned, so pip takes the tested build.
$(VENV)/.installed: $(VENV)/bin/python setup.cfg pyproject.toml
	$(PIP) install "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -e ".[onnx]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -e ".[onnx,dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## make quickstart: install, then run the embedded default experiment
quickstart: install
	$(VENV)/bin/distill run experiments/quickstart.yaml

## make test: install with dev extras, then run the whole test suite (TEST_WORKERS pytest-xdist processes, one
## torch thread each: tests/conftest.py; --dist loadscope keeps a module's tests on one worker, so a module's
## fixture, often a tiny finished run, is built once instead of once per worker)
TEST_WORKERS ?= 2
test: install-dev
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=15 tests

## make lint: install with dev extras, then check the tree with ruff (rules and exceptions: pyproject.toml)
lint: install-dev
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
