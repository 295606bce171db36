#!/usr/bin/env bash
# Every GPU check in one run (about 5 minutes on an H200): the CUDA tests, the bf16 training-step benchmark
# against the peers (MFU against the data-sheet peak), and the decode benchmark. It refuses to run, loudly,
# on a machine without a CUDA GPU rather than measuring the CPU.
#
#     bench/gpu_check.sh            # from the repository root; PYTHON=... picks the interpreter (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU found (torch.cuda.is_available() is False in $PYTHON); nothing was measured" >&2
    exit 1
fi
"$PYTHON" -c 'import palm' 2>/dev/null || "$PYTHON" -m pip install -q --no-deps -e .
"$PYTHON" - <<'PY'
import torch
p = torch.cuda.get_device_properties(0)
print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, torch {torch.__version__}")
PY
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_model.py tests/test_model_transformers.py tests/test_generate.py
"$PYTHON" bench/train.py --shapes small --dtype bf16 --rounds 3 --json "${OUT:-/tmp}/gpu_train_small.json"
"$PYTHON" bench/train.py --shapes 1b --seq 2048 --batch 8 --dtype bf16 --rounds 3 --json "${OUT:-/tmp}/gpu_train_1b.json"
"$PYTHON" bench/decode.py --presets small --rounds 3
"$PYTHON" bench/decode.py --presets small --rounds 3 --compile
