#!/usr/bin/env bash
# The fast-path / steering-overhead runs of issue 18 on one lent GPU, one stage per call:
#   bash benchmarks/gpu_fast_ab.sh OUT ab        shuffled-round A/B with A/A control, eager + fast, b 1 and 32
#   bash benchmarks/gpu_fast_ab.sh OUT autotune  fast vs fast with a max-autotune decode step + kernel profile
#   bash benchmarks/gpu_fast_ab.sh OUT final     fast and fast-autotune only, 300 rounds at batch 1, 60 at 32
#   bash benchmarks/gpu_fast_ab.sh OUT kernels   decode/prefill kernel microbenchmarks + hooks-vs-nnsight diagnosis
#   bash benchmarks/gpu_fast_ab.sh OUT diagnose  the diagnosis under each suspected cause + the GEMV tile sweep
#   bash benchmarks/gpu_fast_ab.sh OUT triton    fast (Triton kernels) vs fast-library, b 1 and 32 (ROUNDS, ROUNDS_LARGE:
#                                                150 and 20 by default); eager and fast repeatability at batch 32
#   bash benchmarks/gpu_fast_ab.sh OUT attention one-query attention (SDPA backends, FlexAttention, the split-KV Triton kernel)
#                                                and the vision towers (one graph, compiled, on two streams)
# The nnsight diagnosis needs nnsight's wheels and the ones the device image lacks in .whl/ (carry it):
#   greenlet pydantic pydantic_core annotated-types typing-inspection websocket-client zstandard, pinned by
#   constraints.txt (pip download line in /work/.library/device/README.md, Python 3.12, manylinux x86-64).
# Logs and JSON land in OUT (the device tool's $OUT comes back).
set -u
out=${1:?usage: gpu_fast_ab.sh OUT ab|autotune|final|kernels|diagnose|triton|attention}
stage=${2:?stage}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$HOME/site" .whl/*.whl \
    && export PYTHONPATH=$HOME/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader > "$out/gpu.txt" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$out/gpu.txt" 2>&1
diag() {  # diagnose_backends.py under each named condition, one JSON each
  for c in "$@"; do
    python3 benchmarks/diagnose_backends.py --condition "$c" --out "$out/diag_$c.json" >> "$out/diag.md" 2>> "$out/diag.log"
    echo "diag $c rc=$?"
  done
}
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
  kernels)
    python3 benchmarks/decode_kernels.py --out "$out/decode_kernels.json" > "$out/kernels.md" 2> "$out/kernels.log"
    echo "kernels rc=$?"
    diag default ;;
  triton)
    python3 benchmarks/bench_steering_ab.py --out "$out/triton_ab.json" --no-eager --library \
      --rounds "${ROUNDS:-150}" --rounds-large "${ROUNDS_LARGE:-20}" > "$out/triton.md" 2> "$out/triton.log"
    echo "triton ab rc=$?"
    diag ${DIAG:-fast default} ;;
  attention)
    python3 benchmarks/decode_kernels.py --only attention,vision --out "$out/attention.json" > "$out/attention.md" 2> "$out/attention.log"
    echo "attention rc=$?" ;;
  diagnose)
    diag default deterministic sdpa-math sdpa-efficient fast
    python3 benchmarks/decode_kernels.py --only gemv --out "$out/gemv.json" > "$out/kernels.md" 2> "$out/kernels.log"
    echo "gemv rc=$?" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
cat "$out"/*.md 2>/dev/null | tail -n 80
tail -n 5 "$out"/*.log
