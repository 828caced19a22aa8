#!/usr/bin/env bash
# One GPU session: kernel and model tests on the real GPU, then side-by-side throughput.
# Each part has its own time limit so one slow part cannot eat the others' time.
# Usage (on the GPU machine, from the repo root): bash benchmarks/gpu_run.sh OUT_DIR
set -uo pipefail
out=${1:-gpu_out}
mkdir -p "$out"
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_ce.py \
  tests/test_kernels_nf4.py tests/test_kernels_dispatch.py 2>&1 | tail -25 | tee "$out/tests.log"
tp() {  # workload stacks time-limit
  timeout "$3" python3 benchmarks/train_throughput.py --workload "$1" --stacks "$2" \
    --steps 4 --warmup 2 --out "$out/throughput_$1.json" >"$out/throughput_$1.log" 2>&1
  echo "== $1 (exit $?)"; tail -14 "$out/throughput_$1.log"
}
tp lora8b llamaforge,hf 130
tp full1b llamaforge-bf16,llamaforge,llamaforge-plain,hf 75
tp qlora8b llamaforge 50
