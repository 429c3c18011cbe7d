# Set-up and entry points. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install data demo test test-slow test-all lint clean gpu-check

# Real images, offline: Fashion-MNIST from Debian's dataset-fashion-mnist (its four IDX files).
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	# The exact pin first: a loose torch requirement would pull the multi-GB CUDA build.
	$(BIN)/pip install torch==2.13.0

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -e ".[experiments,dev,onnx,kernels]"
	# The native CPU kernels, compiled once per machine (~30 s; without a C++ compiler: a warning, eager path)
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

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-all: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests

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
	rm -rf $(VENV) build dist src/*.egg-info
