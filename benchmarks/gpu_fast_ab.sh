#!/usr/bin/env bash
# The fast-path / steering-overhead runs of issue 18 on one lent GPU, one stage per call:
#   bash benchmarks/gpu_fast_ab.sh OUT ab        shuffled-round A/B with A/A control, eager + fast, b 1 and 32
#   bash benchmarks/gpu_fast_ab.sh OUT autotune  fast vs fast with a max-autotune decode step + kernel profile
#   bash benchmarks/gpu_fast_ab.sh OUT final     fast and fast-autotune only, 300 rounds at batch 1, 60 at 32
# Logs and JSON land in OUT (the device tool's $OUT comes back).
set -u
out=${1:?usage: gpu_fast_ab.sh OUT ab|autotune|final}
stage=${2:?stage}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader > "$out/gpu.txt" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$out/gpu.txt" 2>&1
case $stage in
  ab)
    python3 benchmarks/bench_steering_ab.py --out "$out/steering_ab.json" --fp32-check > "$out/ab.md" 2> "$out/ab.log"
    echo "ab rc=$?" ;;
  autotune)
    python3 benchmarks/profile_fast_step.py --out "$out/profile.json" > "$out/profile.md" 2> "$out/profile.log"
    echo "profile rc=$?"
    python3 benchmarks/bench_steering_ab.py --out "$out/autotune_ab.json" --no-eager --autotune --rounds 60 --rounds-large 20 > "$out/autotune.md" 2> "$out/autotune.log"
    echo "autotune rc=$?" ;;
  final)
    python3 benchmarks/bench_steering_ab.py --out "$out/final_ab.json" --no-eager --autotune --rounds 300 --rounds-large 60 > "$out/final.md" 2> "$out/final.log"
    echo "final rc=$?" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
cat "$out"/*.md 2>/dev/null | tail -n 80
tail -n 5 "$out"/*.log
