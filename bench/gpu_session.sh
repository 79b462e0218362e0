#!/usr/bin/env bash
# One GPU session: the CUDA tests, `lorasc bench` and the ablation (which needs the bundle
# from `python bench/ablation.py prepare`), writing everything under OUT. Run from the repo root
# on a CUDA machine with the project importable (pip install . or PYTHONPATH=$PWD).
#   bash bench/gpu_session.sh [OUT] [ABLATION_SECONDS] [PARTS]
# PARTS: any of "tests bench ablation profile" (default: the first three). The ablation
# resumes from the committed bench/results/ablation/results.jsonl: finished runs are not
# repeated. "profile": device time per kernel of both whole-model boundaries
# (bench/profile_model.py), of cascade_merge_ against its parts (bench/profile_cascade.py) and
# an Nsight Compute profile of the merge modes (bench/ncu_merge.py).
set -uo pipefail
out=${1:-bench/results/gpu}
ablation_s=${2:-250}
parts=${3:-"tests bench ablation"}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  date -u
} > "$out/environment.txt" 2>&1
if [[ $parts == *tests* ]]; then
LORASC_TEST_GPU=1 timeout 150 python -m pytest -q -p no:cacheprovider -n 12 \
  tests/test_gpu.py tests/test_dora.py tests/test_peft_patch.py tests/test_checkpoint_merge.py \
  > "$out/gpu_tests.log" 2>&1
tail -n 3 "$out/gpu_tests.log"
fi
if [[ $parts == *bench* ]]; then
timeout 300 python -m lorasc_fast.cli bench --out "$out" > "$out/bench.log" 2>&1
tail -n 4 "$out/bench.log"
fi
if [[ $parts == *profile* ]]; then
for m in llama2-7b-qv llama3-8b-all; do
  timeout 90 python bench/profile_model.py --model "$m" >> "$out/profile_models.txt" 2>&1
done
timeout 90 python bench/profile_cascade.py --out "$out/profile_cascade.txt" > /dev/null 2>&1
timeout 150 ncu --clock-control none -k regex:merge_kernel --launch-skip 3 --launch-count 3 \
  --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy \
  --section LaunchStats --section WarpStateStats --section SourceCounters \
  --section MemoryWorkloadAnalysis python bench/ncu_merge.py > "$out/ncu_merge.txt" 2>&1
grep -E "Duration|DRAM Throughput|Issue Slots Busy" "$out/ncu_merge.txt" | head -9
fi
if [[ $parts == *ablation* ]]; then
tmp=$(mktemp -d)  # the ablation's tables and plot are rebuilt from its JSONL with `ablation.py report`
timeout $((ablation_s + 20)) env HF_HUB_OFFLINE=1 python bench/ablation.py run --device cuda \
  --workers 8 --budget-seconds "$ablation_s" --out "$tmp" \
  --resume bench/results/ablation/results.jsonl > "$tmp/ablation.log" 2>&1
cp "$tmp/results.jsonl" "$out/ablation_results.jsonl"
tail -n 3 "$tmp/ablation.log"
fi
