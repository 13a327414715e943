# Quickstart targets. Each creates the virtual environment on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
DEMO_DIR := runs/quickstart/demo

.PHONY: demo test test-all lint install benchmarks

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

## benchmarks: the performance scripts of docs/RESULTS.md at their default settings (not tests; about 5 minutes on 2 cores)
benchmarks: install
	$(PY) benchmarks/upi_step_cost.py
	$(PY) benchmarks/upi_pca_rows.py
	$(PY) benchmarks/upi_pca_memory.py
	$(PY) benchmarks/upi_ddp.py
	$(PY) benchmarks/saliency_throughput.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
