#!/usr/bin/env bash
# GPU check of gradprobe: needs a CUDA build of torch and one CUDA device, no network.
# Each part has its own time limit, so one slow part cannot eat the others' time; the
# limits add up to 13 minutes, the worst case. Without CUDA it stops at once with one
# line on stderr and exit status 2. It runs
#   1. the CUDA tests: float16 autocast + GradScaler, and one device-to-host
#      synchronisation per recorded step (torch.cuda.set_sync_debug_mode);
#   2. the counts (benchmarks/gpu_counts.py): CUDA kernels per block and recorded step
#      and synchronisations per recorded step, probed minus bare, on ResNet-56 at batch
#      128 (also with float16 + GradScaler) and on the GPT-2 config;
#   3. the overhead harness on CUDA (benchmarks/overhead.py): ResNet-56 at batch 128,
#      every metric on every step beside the floor (benchmarks/floor.py: one reduction
#      per x, y, g_y, g_x of each block) and every=10; the GPT-2 config (6 layers, width
#      128, sequence 64, batch 16) the same; then jacobian=10 on ResNet-56 at batch 128
#      over one whole spectral cycle (200 steps) per chunk, last, as the longest part.
# Paste the markdown rows it prints into the docs' performance page, with the GPU's name
# (the first line).
#
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

"$PY" - <<'PYEOF' || { echo "gpu_check.sh: needs a CUDA build of torch and a CUDA device; none here" >&2; exit 2; }
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PYEOF

run() {  # run LIMIT_SECONDS TITLE COMMAND...: one part, its own time limit; a failure marks the check
    local limit=$1 title=$2
    shift 2
    echo "== $title"
    timeout "$limit" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "== FAILED ($([ $rc -eq 124 ] && echo "over its ${limit} s" || echo "exit $rc")): $title"
        status=1
    fi
}

run 120 "CUDA tests (float16 autocast + GradScaler, one host sync per recorded step)" \
    "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_setups.py -k "cuda"

run 60 "counts, ResNet-56, batch 128: kernels per block, syncs per recorded step" \
    "$PY" benchmarks/gpu_counts.py --model resnet56 --batch 128 --steps 10
run 60 "counts, ResNet-56, batch 128, float16 + GradScaler" \
    "$PY" benchmarks/gpu_counts.py --model resnet56 --batch 128 --steps 10 --scaler
run 60 "counts, GPT-2 config" \
    "$PY" benchmarks/gpu_counts.py --model gpt2 --steps 10

run 150 "overhead, ResNet-56, batch 128: every step beside the floor, every=10" \
    "$PY" benchmarks/overhead.py --model resnet56 --device cuda --batch 128 --pairs 6 \
    --config default every10 --floor
run 90 "overhead, GPT-2 config: every step beside the floor, every=10" \
    "$PY" benchmarks/overhead.py --model gpt2 --device cuda --pairs 6 --config default every10 --floor
run 240 "overhead, ResNet-56, batch 128, jacobian=10 over one spectral cycle (201-step chunks)" \
    "$PY" benchmarks/overhead.py --model resnet56 --device cuda --batch 128 --pairs 2 --cycles 1 \
    --config jacobian10

exit $status
