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

test: install
	$(BIN)/python -m pytest -q -x tests

.PHONY: install demo test
