# Quickstart targets. Each creates the virtual environment on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
DEMO_DIR := runs/quickstart/demo

.PHONY: demo test test-all lint install benchmarks gpu-benchmarks

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $@

## demo: train a small CNN on the offline synthetic dataset, attack its saliency maps, print where the outputs are
demo: install
	rm -rf $(DEMO_DIR)
	$(PY) train.py fit --config configs/quickstart.yaml --trainer.logger.init_args.version=demo
	$(PY) attack.py --config configs/attack_quickstart.yaml --ckpt $(DEMO_DIR)/checkpoints/last.ckpt \
		--output $(DEMO_DIR)/attack
	@echo "Demo done. Training logs and checkpoints: $(DEMO_DIR); attack report: $(DEMO_DIR)/attack/report.md"
	@echo "View both: $(VENV)/bin/tensorboard --logdir $(DEMO_DIR)"

## test: the default test suite (slow tests excluded)
test: install
	$(PY) -m pytest -m "not slow"

## test-all: every test, slow ones included
test-all: install
	$(PY) -m pytest

## benchmarks: the performance scripts of docs/RESULTS.md at their default settings (not tests; about 8 minutes on 2 idle cores)
benchmarks: install
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/upi_step_cost.py
	$(PY) benchmarks/upi_pca_rows.py
	$(PY) benchmarks/upi_pca_memory.py
	$(PY) benchmarks/upi_ddp.py
	$(PY) benchmarks/saliency_throughput.py
	$(PY) benchmarks/training_modes.py --modes input_grad ir upi_adv consistency gradient_consistency
	$(PY) benchmarks/captum_peer.py
	$(PY) benchmarks/saliency_attack_cost.py

## gpu-benchmarks: on a machine with one GPU, every GPU-only figure of docs/RESULTS.md into gpu-benchmarks.json (< 8 minutes)
gpu-benchmarks: install
	PYTHON=$(PY) benchmarks/gpu.sh --output gpu-benchmarks.json

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
