#!/usr/bin/env bash
# Every GPU line of README "Benchmarks" in one command, on a machine with CUDA and the
# packages of pyproject (bitsandbytes, trl, datasets; liger-kernel for the `liger` lever).
#   STOCK=../shared/bench/stock_qlora_sft.py bash bench/gpu_all.sh
# The GPU-only kernel checks, SFT stock-vs-shomin (the stage's defaults) on llama7b and neox7b, the PPO step on the neox20b shape (8-bit and
# 4-bit base), the 2-GPU line when two GPUs are visible, then the memory plan check.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${STOCK:?set STOCK to the stock script (../shared/bench/stock_qlora_sft.py)}"
export BENCH_DIR=${BENCH_DIR:-/tmp/bench} OUT=${OUT:-bench/out}
mkdir -p "$OUT" "$BENCH_DIR"
CUDA_VISIBLE_DEVICES=0 python3 bench/gpu_check_kernels.py
CUDA_VISIBLE_DEVICES=0 python3 bench/gpu_compare.py "$STOCK" llama7b 2048 4 13 default
CUDA_VISIBLE_DEVICES=0 python3 bench/gpu_compare.py "$STOCK" neox7b 2048 4 13 default
rm -rf "$BENCH_DIR"/rand_neox7b   # disk: the 20B checkpoint needs ~41 GB
for q in 8bit 4bit; do CUDA_VISIBLE_DEVICES=0 python3 bench/gpu_ppo.py neox20b $q 16 16 3 | grep '^{"arch"'; done
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  bash bench/gpu_multi.sh llama7b 2048 4 13 2
fi
python3 bench/plan_check.py
