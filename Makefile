# Set-up and entry points. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install data demo test test-slow test-all test-timm lint clean gpu-check

# Real images, offline: Fashion-MNIST from Debian's dataset-fashion-mnist (its four IDX files).
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	# The exact pin first: a loose torch requirement would pull the multi-GB CUDA build.
	$(BIN)/pip install torch==2.13.0

$(VENV)/.installed: $(BIN)/python pyproject.toml
	# torch pinned on the same line: lightning and opacus depend on it, and pip must not replace it
	$(BIN)/pip install torch==2.13.0 -e ".[experiments,dev,onnx,kernels]"
	# The native CPU kernels: compiled once per machine (30-70 s), loaded from the cache by later venvs
	# (without a C++ compiler: a warning, eager route)
	$(BIN)/python -c "import batchless.fused as f; f.build_cpu_kernels()"
	touch $@

install: $(VENV)/.installed data

data:
	@if [ -f $(FASHION_MNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST is not installed: run 'sudo apt-get install dataset-fashion-mnist', or pass"; \
		echo "--data-dir DIR (its four IDX files) to batchless; meanwhile the demo falls back to MNIST-1D."; \
	fi

demo: install
	$(BIN)/batchless demo

# The default suite; the tests whose route matters run on each (native kernels, eager; see tests/variants.py).
test: install
	$(BIN)/python -m pytest -q -m "not slow"

# timm imports torchvision, and PyPI's torchvision for torch 2.13.0 is a CUDA build that cannot load beside the
# CPU torch of $(VENV) ("operator torchvision::nms does not exist"); so the timm tests get a venv of their own,
# with a torch/torchvision pair that imports (the library itself does not need timm). x86_64: torch 2.14.1 and
# torchvision 0.29.1, a CUDA build run on the CPU (5.6 GB; 1.5 min from the wheels on this project's machines,
# several GB of downloads elsewhere); aarch64: CPU builds (0.7 GB). Without native kernels: the eager path.
TIMM_VENV ?= .venv-timm
TIMM_TORCH ?= $(if $(filter aarch64,$(shell uname -m)),torch==2.9.1 torchvision==0.24.1,torch==2.14.1 torchvision==0.29.1)

$(TIMM_VENV)/.installed:
	$(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/pip install $(TIMM_TORCH)
	$(TIMM_VENV)/bin/pip install $(TIMM_TORCH) "timm>=1.0" "pytest>=7.4"  # torch pinned again: timm must not move it
	touch $@

test-timm: $(TIMM_VENV)/.installed
	BATCHLESS_FUSED=never PYTHONPATH=src $(TIMM_VENV)/bin/python -m pytest -q tests/test_timm.py

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-all: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests docs/experiments

# On a CUDA machine whose python3 already has torch (nothing installed): the CUDA tests, then the CUDA
# speed (fused vs eager vs cuDNN BatchNorm) and memory benchmarks, written to $(GPU_OUT).
GPU_OUT ?= docs
GPU_RUN := PYTHONPATH=src $(PYTHON)
gpu-check:
	$(GPU_RUN) -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_robustness.py -k "cuda or fused"
	$(GPU_RUN) -m batchless_experiments bench speed --device cuda --fused --compile --out $(GPU_OUT)/bench_speed_cuda.json
	$(GPU_RUN) -m batchless_experiments bench memory --device cuda --out $(GPU_OUT)/bench_memory_cuda.json \
		--plot $(GPU_OUT)/bench_memory_cuda.png

clean:
	rm -rf $(VENV) $(TIMM_VENV) build dist src/*.egg-info
