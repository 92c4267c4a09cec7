#!/usr/bin/env bash
# Multi-GPU run (see docs/distributed.md):  bash benchmarks/gpu_multi.sh OUT_DIR NPROC
set -u
out=${1:?usage: gpu_multi.sh OUT_DIR NPROC}
n=${2:-2}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$HOME/site" .whl/*.whl \
    && export PYTHONPATH=$HOME/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1
t0=$(date +%s)
python3 benchmarks/bench_distributed.py --nproc "$n" --out "$out/distributed.json" > "$out/distributed.log" 2>&1
echo "distributed rc=$? $(( $(date +%s) - t0 ))s" | tee -a "$out/status.txt"
t0=$(date +%s)
python3 -m pytest -q -p no:cacheprovider -o addopts="--import-mode=importlib" tests/distributed/test_placement.py -k two_gpu > "$out/placement.log" 2>&1
echo "placement rc=$? $(( $(date +%s) - t0 ))s" | tee -a "$out/status.txt"
tail -n 40 "$out/distributed.log"; tail -n 15 "$out/placement.log"
