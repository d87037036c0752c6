# Everything runs from a local virtual environment (.venv) that `make setup` creates.
# On a CPU-only machine the pinned torch is the CPU build; on a GPU machine pass TORCH_SPEC=torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -q

.PHONY: setup demo test bench lint clean

$(BIN)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "setuptools>=64" wheel
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" pybind11 ninja
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,hf,bench]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m prefix_attn.info
	$(BIN)/python -m prefix_attn.demo

test: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/bench_attention.py

lint: setup
	$(BIN)/python -m pip install -q ruff
	$(BIN)/python -m ruff check prefix_attn tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info prefix_attn/*.so
