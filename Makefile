# The two Quickstart commands: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# MindEye on the embedded simulated dataset, 2 CPU ranks under ZeRO-2. bf16 is turned off
# here because CPUs without native bf16 emulate it about 10x slower than fp32.
demo: install
	OMP_NUM_THREADS=1 PATH=$(abspath $(BIN)):$$PATH deepspeed --num_gpus 2 train/main.py \
		--ds_config ds_configs/zero2.json --overwrite run_dir=runs/demo ds.bf16.enabled=false

# The rest of MindEye's chain on the demo run: the low-level branch, reconstruction of every
# test image with a small random generator, and scoring (random feature extractors: the
# embedded dataset has no pretrained weights, so those columns only show that the chain runs).
demo-recon: install
	OMP_NUM_THREADS=1 PATH=$(abspath $(BIN)):$$PATH deepspeed --num_gpus 2 train/main.py \
		--config train/configs/mindeye_lowlevel_tiny.yaml --ds_config ds_configs/zero2.json --overwrite \
		run_dir=runs/demo_lowlevel ds.bf16.enabled=false
	OMP_NUM_THREADS=2 $(BIN)/python -m train.reconstruct --checkpoint runs/demo --lowlevel runs/demo_lowlevel
	OMP_NUM_THREADS=2 $(BIN)/python -m eval --checkpoint runs/demo --recons runs/demo/reconstructions \
		--random-weights --extractors alexnet,inception --n-way-classifier inception --overwrite

# DeepSpeed compiles its CPU shared-memory allreduce op on first use (about 40 s) into
# TORCH_EXTENSIONS_DIR; one folder per environment, so that environments at other paths on the
# same machine (which compile with other flags) do not make each other rebuild it.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

# The whole suite; test-fast leaves out the tests marked slow (training runs, launched
# processes: see tests/conftest.py) and takes a few minutes. More pytest options:
# make test PYTEST_ARGS="--durations=25".
test: install
	$(BIN)/python -m pytest -q -x -rs $(PYTEST_ARGS) tests

test-fast: install
	$(BIN)/python -m pytest -q -x -rs -m "not slow" $(PYTEST_ARGS) tests

.PHONY: install demo demo-recon test test-fast
