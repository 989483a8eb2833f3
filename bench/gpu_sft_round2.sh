#!/usr/bin/env bash
# SFT round two (README "Benchmarks"): the four shapes stock vs shomin, the real-length line,
# one after another on one GPU. Long context is bench/maxctx.py (stock: the stock script's maxctx).
#   STOCK=../shared/bench/stock_qlora_sft.py bash bench/gpu_sft_round2.sh
# Writes $OUT/compare.jsonl and $OUT/reallen.jsonl; each shape's checkpoint is deleted after it
# (four 8B checkpoints do not fit a 64 GB disk together).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${STOCK:?set STOCK to the stock script}"
export BENCH_DIR=${BENCH_DIR:-/tmp/bench} OUT=${OUT:-bench/out}
mkdir -p "$OUT" "$BENCH_DIR"
python3 bench/gpu_reallen.py llama3_8b 16 20
for arch in llama3_8b llama7b neox7b qwen2_7b; do
  python3 bench/gpu_compare.py "$STOCK" "$arch" 2048 4 13 default default,chunk2048
  rm -rf "$BENCH_DIR/rand_$arch"
done
