#!/usr/bin/env bash
# Single-GPU benchmark suite, as run on the lent H100/H200 (see docs/benchmarks.md).
#   bash benchmarks/gpu_suite.sh OUT_DIR [part]   part: a (capture, openvla, rdt) | b (fast path, capture, agreement) | c (capture, rdt) | all
# Each benchmark runs even if an earlier one failed; logs and JSON land in OUT_DIR.
set -u
out=${1:?usage: gpu_suite.sh OUT_DIR [a|b|all]}
part=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$HOME/site" .whl/*.whl \
    && export PYTHONPATH=$HOME/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$out/gpu.txt" 2>&1
run() {  # name, command...
  local name=$1; shift
  local t0=$(date +%s)
  "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 ))s" | tee -a "$out/status.txt"
}
if [ "$part" = a ] || [ "$part" = all ]; then
  run capture python3 benchmarks/bench_capture.py --model llama-2-7b-random --device cuda --n 512 --batch-size 64 --repeats 3 --out "$out/capture.json"
  run openvla python3 benchmarks/bench_openvla.py --device cuda --out "$out/openvla.json"
  run rdt_overhead python3 benchmarks/bench_rdt_overhead.py --device cuda --out "$out/rdt_overhead.json" --budget-s 200
fi
if [ "$part" = b ] || [ "$part" = all ]; then
  run fast_path python3 benchmarks/bench_fast_path.py --device cuda --out "$out/fast_path.json"
  run capture2 python3 benchmarks/bench_capture.py --model llama-2-7b-random --device cuda --n 512 --batch-size 64 --repeats 3 --out "$out/capture2.json"
  run agreement python3 benchmarks/check_backend_agreement.py --device cuda --out "$out/agreement.json"
fi
if [ "$part" = c ]; then
  run capture3 python3 benchmarks/bench_capture.py --model llama-2-7b-random --device cuda --n 512 --batch-size 64 --repeats 5 --out "$out/capture3.json"
  run rdt_overhead2 python3 benchmarks/bench_rdt_overhead.py --device cuda --out "$out/rdt_overhead2.json" --budget-s 200
fi
tail -n 30 "$out"/*.log | grep -v -i warn | tail -n 120
