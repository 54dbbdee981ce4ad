#!/usr/bin/env bash
# GPU check of gradprobe: needs a CUDA build of torch and one CUDA device, no network,
# and finishes in under 5 minutes. It runs
#   1. the CUDA tests: float16 autocast + GradScaler, and one device-to-host
#      synchronisation per recorded step (torch.cuda.set_sync_debug_mode),
#   2. the overhead harness on CUDA: ResNet-56 at batch 128 (every metric on every
#      step, every=10, Jacobian columns every 10th step) and the GPT-2 config
#      (6 layers, width 128, sequence 64, batch 16).
# Each part has its own time limit, so one slow part cannot eat the others' time.
# Paste the markdown rows it prints into the README's Performance section.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

"$PY" - <<'PYEOF' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device: this check needs one"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PYEOF

echo "== CUDA tests (float16 autocast + GradScaler, one host sync per recorded step)"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_setups.py -k "cuda" || status=1

echo "== overhead harness, ResNet-56, batch 128, CUDA"
timeout 120 "$PY" benchmarks/overhead.py --model resnet56 --device cuda --batch 128 --pairs 4 \
    --config default every10 jacobian10 || status=1

echo "== overhead harness, GPT-2 config, CUDA"
timeout 60 "$PY" benchmarks/overhead.py --model gpt2 --device cuda --pairs 6 --config default every10 || status=1

exit $status
