#!/usr/bin/env bash
# One GPU session: the CUDA tests, `lorasc bench`, the pytest-benchmark benchmarks and the
# ablation, writing everything under OUT (default bench/results/gpu). Run from the repo root
# on a CUDA machine with the project importable (pip install . or PYTHONPATH=$PWD).
#   bash bench/gpu_session.sh [OUT] [ABLATION_SECONDS]
set -uo pipefail
out=${1:-bench/results/gpu}
ablation_s=${2:-280}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  date -u
} > "$out/environment.txt" 2>&1
LORASC_TEST_GPU=1 timeout 150 python -m pytest -q -p no:cacheprovider -n 8 \
  tests/test_gpu.py tests/test_dora.py tests/test_peft_patch.py tests/test_checkpoint_merge.py \
  > "$out/gpu_tests.log" 2>&1
tail -n 3 "$out/gpu_tests.log"
timeout 240 python -m lorasc_fast.cli bench --out "$out" > "$out/bench.log" 2>&1
tail -n 4 "$out/bench.log"
timeout 60 python -m pytest -q -p no:cacheprovider bench/test_bench_ops.py --benchmark-only \
  --benchmark-json="$out/pytest_benchmark.json" > /dev/null 2>&1
tmp=$(mktemp -d)
timeout $((ablation_s + 30)) python bench/ablation.py run --device cuda --budget-seconds "$ablation_s" \
  --out "$tmp" > "$tmp/ablation.log" 2>&1
cp "$tmp/results.jsonl" "$out/ablation_results.jsonl" 2>/dev/null
tail -n 3 "$tmp/ablation.log"
