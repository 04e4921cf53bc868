# The README's two commands: `make demo` and `make test`. Both install first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

.PHONY: install demo test test-all bench clean

install: $(VENV)/.installed

# torch is pinned to the CPU build that lies on this machine's disk; a plain
# `pip install torch` would fetch a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install -q -e ".[torch,search,dev]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import slimgraph, torch, onnxruntime, onnx_ir, onnxscript, magika, silero_vad"
	touch $@

demo: install
	$(BIN)/python examples/demo.py

# Fast suite: unit/golden tests plus at least one real model per capability.
test: install
	$(PYTEST) -m "not slow"

# Everything, including the slow real-model tests.
test-all: install
	$(PYTEST)

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
