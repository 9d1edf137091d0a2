# psft-megatron: `make test` and `make demo` set everything up in .venv and run.
#
#   make test        install (CPU path: torch==2.13.0 if torch is missing) and run the test suite
#   make demo        install and run the demo job (PSFT on configs/tiny_cpu.yaml, 2 gloo processes, TP=2 + SP)
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

DEMO_DIR ?= runs/tiny_cpu
demo: install
	OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore $(PY) -m torch.distributed.run --standalone --nproc_per_node 2 \
		pretrain_psft.py --config-path configs --config-name tiny_cpu exp_manager.explicit_log_dir=$(DEMO_DIR)
	$(PY) tools/plot_metrics.py $(DEMO_DIR)/metrics.jsonl -o $(DEMO_DIR)/metrics.png
	@echo
	@echo "checkpoint:   $(DEMO_DIR)/checkpoints/$$(cat $(DEMO_DIR)/checkpoints/latest)"
	@echo "tensorboard:  tensorboard --logdir $(DEMO_DIR)/tensorboard"
	@echo "metrics:      $(DEMO_DIR)/metrics.jsonl"
	@echo "plot:         $(DEMO_DIR)/metrics.png"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
