# psft-megatron: `make test` and `make demo` set everything up in .venv and run.
#
#   make test        install (CPU path: torch==2.13.0 if torch is missing) and run the test suite
#   make demo        install and run the demo job (PSFT, 2 gloo processes, TP=2 + SP)
#   make install     only the set-up
#
# On a GPU node with torch already installed (e.g. an NGC PyTorch container), reuse the
# container's torch and Transformer Engine:  make test VENV_FLAGS=--system-site-packages

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
VENV_FLAGS ?=
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test demo clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -ra $(PYTEST_ARGS) tests

demo: install
	OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore $(PY) -m torch.distributed.run --standalone --nproc_per_node 2 \
		examples/psft_plugin_demo.py --tp 2 --steps 40

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
