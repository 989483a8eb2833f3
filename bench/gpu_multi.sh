#!/usr/bin/env bash
# The SFT stage on 1 GPU and under `accelerate launch` on N GPUs, same per-GPU batch (data parallel).
# Usage: bash bench/gpu_multi.sh ARCH SEQ BATCH STEPS NGPU [VARIANT]   (VARIANT of bench/gpu_sft.py,
# default `default`; needs a checkpoint from the stock script, or makes one with it:
# STOCK=path/to/stock_qlora_sft.py)
set -euo pipefail
ARCH=$1 SEQ=$2 BATCH=$3 STEPS=$4 N=$5 VARIANT=${6:-default}
export BENCH_DIR=${BENCH_DIR:-/tmp/bench}
if [ ! -f "$BENCH_DIR/rand_$ARCH/config.json" ]; then CUDA_VISIBLE_DEVICES=0 python3 "$STOCK" "$ARCH" qlora "$SEQ" "$BATCH" 4 | tail -1; fi
one=$(CUDA_VISIBLE_DEVICES=0 python3 bench/gpu_sft.py "$ARCH" "$SEQ" "$BATCH" "$STEPS" "$VARIANT" 2>"${OUT:-/tmp}/one.log" | grep '^{"arch"')
many=$(accelerate launch --num_processes "$N" --multi_gpu bench/gpu_sft.py "$ARCH" "$SEQ" "$BATCH" "$STEPS" "$VARIANT" 2>"${OUT:-/tmp}/many.log" | grep '^{"arch"')
echo "$one"; echo "$many"
python3 - "$one" "$many" <<'PY'
import json, sys
a, b = (json.loads(x) for x in sys.argv[1:3])
print(f"1 GPU {a['tokens_per_s']} tok/s, {b['gpus']} GPUs {b['tokens_per_s']} tok/s: x{b['tokens_per_s'] / a['tokens_per_s']:.2f}")
PY
