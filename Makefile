# Everything runs from a local virtual environment (.venv) that `make setup` creates.
# On a CPU-only machine the pinned torch is the CPU build; on a GPU machine pass TORCH_SPEC=torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# the newest installable transformers by default; `make test-hf-oldest` runs the HF tests on the oldest supported
TRANSFORMERS_SPEC ?= transformers>=5.23
HF_OLDEST ?= 5.23.0
PYTEST_ARGS ?= -q
# the GPU machine's Triton, in a directory of its own: tests compile the kernels for sm_90 with it (no GPU needed)
GPU_TRITON_SPEC ?= triton==3.6.0
GPU_TRITON_DIR ?= .triton36
HF_TESTS := tests/test_hf_families.py tests/test_transformers_integration.py tests/test_hf_training.py \
	tests/test_hf_packed.py tests/test_hf_bank.py tests/test_hf_dropout.py tests/test_prefix_hidden.py \
	tests/test_autocast.py tests/test_hf_checkpoints.py tests/test_hf_encoders.py \
	tests/test_hf_seq2seq.py tests/test_grouped.py

.PHONY: setup demo test test-hf-oldest bench lint clean

$(BIN)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "setuptools>=64" wheel
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" pybind11 ninja
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,hf,bench]"
	$(BIN)/python -m pip install -q --upgrade "$(TRANSFORMERS_SPEC)"
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(GPU_TRITON_DIR) "$(GPU_TRITON_SPEC)"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m prefix_attn.info
	$(BIN)/python -m prefix_attn.demo

test: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-hf-oldest:  # the Hugging Face tests on the oldest supported transformers, in a venv of their own
	$(MAKE) setup VENV=.venv-hf-oldest TRANSFORMERS_SPEC=transformers==$(HF_OLDEST)
	TRITON_INTERPRET=1 .venv-hf-oldest/bin/python -m pytest $(PYTEST_ARGS) $(HF_TESTS)

bench: setup
	$(BIN)/python benchmarks/bench_attention.py

lint: setup
	$(BIN)/python -m pip install -q ruff
	$(BIN)/python -m ruff check prefix_attn tests benchmarks examples

clean:
	rm -rf $(VENV) .venv-hf-oldest $(GPU_TRITON_DIR) build *.egg-info prefix_attn/*.so
