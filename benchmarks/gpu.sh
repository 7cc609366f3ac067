#!/usr/bin/env bash
# The device check (issue 15): on a CUDA machine, the CUDA tests, the kernel, memory and
# encoder-batching benchmarks on CUDA and `vstream ask --device cuda` end to end with a tiny checkpoint,
# each step under STEP_SECONDS (default 150; the whole under 8 minutes), logs and results
# under $OUT (STEPS="tests star_update" runs those steps alone). It installs nothing from the network.
#
# Device machine (its image has torch, triton and transformers, not PyAV or FAISS):
#   here:  make gpu-wheels         # PyAV and faiss-cpu wheels for its Python 3.12 into .whl/
#   there: bash benchmarks/gpu.sh  # the device tool's run, carrying .whl
# Any machine with the project's .venv (CPU or CUDA):
#   bash benchmarks/gpu.sh --self-check   # the same steps on the session's device, CUDA tests skipped without one
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
LOGS=$(mktemp -d)  # one log per step; $OUT/all.log holds them all (the device tool returns at most 8 files)
STEP_SECONDS=${STEP_SECONDS:-150}
export PYTHONUNBUFFERED=1

if [ "${1:-}" = "--self-check" ]; then
    PY=.venv/bin/python
else
    [ -d .whl ] || { echo "no .whl/: run 'make gpu-wheels' here and carry .whl"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 2
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 2
    export PYTHONPATH=/tmp/site
    PY=python3
fi
# -P: the checkout root never goes on sys.path (our folders must not shadow packages)
DEVICE=$($PY -P -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; $PY -P -c "import torch, vstream; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', '$DEVICE', 'vstream', vstream.__version__)"; } > "$OUT/card.txt" 2>&1
cat "$OUT/card.txt"

failed=0
STEPS=${STEPS:-tests kernels star_update memory batching checkpoint ask}  # a subset for a short rerun
step() {  # step NAME COMMAND...: run it under the step limit into $OUT/NAME.log, show its end
    local name=$1; shift
    case " $STEPS " in *" $name "*) ;; *) return ;; esac
    echo "== $name"
    timeout "$STEP_SECONDS" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    { echo "== $name (exit $rc)"; cat "$LOGS/$name.log"; } >> "$OUT/all.log"
    tail -n 3 "$LOGS/$name.log"
    if [ $rc -ne 0 ]; then echo "!! $name failed (exit $rc)"; failed=1; fi
}

# On CUDA the kernels run compiled, checked against their references at the real shapes
# (test_device.py); on the CPU, Triton's interpreter runs them (test_kernels.py). The
# interpreter is not run on the device machine: its image's Triton interpreter fails
# with its NumPy (a 1-element array where a scalar is expected).
if [ "$DEVICE" = cuda ]; then
    step tests env TRITON_INTERPRET=0 $PY -P -m pytest -q -p no:cacheprovider -rs tests/test_device.py
else
    step tests $PY -P -m pytest -q -p no:cacheprovider -rs tests/test_device.py tests/test_kernels.py
fi
step kernels $PY -P benchmarks/kernel_speed.py
step star_update $PY -P benchmarks/star_update.py --device "$DEVICE" --profile
step memory $PY -P benchmarks/memory.py --frames 3600 --repeat 20 --device "$DEVICE"
# streams one encoder sustains, batched or not: a CLIP-L shape on the GPU, a short smoke run on a CPU
if [ "$DEVICE" = cuda ]; then BATCHING="--tower clip-large --streams 32 --frames 8"; else BATCHING="--streams 2 --frames 1 --repeats 1"; fi
step batching $PY -P benchmarks/encoder_batching.py $BATCHING --device "$DEVICE"
TINY=$(mktemp -d)
step checkpoint $PY -P -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from tiny_models import tiny_llama; tiny_llama(Path('$TINY/llama'))"
step ask $PY -P -m vstream ask tests/data/speech.mp4 "What is shown?" --model "$TINY/llama" --no-asr --no-ocr \
    --encoder pixels --device "$DEVICE" --max-new-tokens 8 --json
grep -h "^RESULT" "$LOGS"/*.log > "$OUT/results.txt"
echo "== results ($DEVICE)"; cat "$OUT/results.txt"
exit $failed
