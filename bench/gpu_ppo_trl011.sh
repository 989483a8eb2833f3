#!/usr/bin/env bash
# PPO step: shomin's stage vs seed 003's recipe (TRL 0.11.4 PPOTrainer + PEFT,
# ../shared/bench/trl011_ppo.py) side by side, on one random gpt-neox-20b checkpoint with
# the same settings (16 queries of 2-8 tokens, 16 new tokens, mini-batch 4, 4 PPO epochs,
# LoRA r16 a32 on query_key_value, reference = adapter disabled), 8-bit and 4-bit base.
#
#   TRL011=../shared/bench/trl011_ppo.py TRL011_SITE=/tmp/site011 bash bench/gpu_ppo_trl011.sh [STEPS] [QUANTS]
#
# TRL011_SITE is a folder holding only the TRL 0.11 stack (the reference's docstring lists it;
# `pip install --no-deps --target`); shomin runs on the installed packages. Each line of
# $OUT/ppo_trl011.jsonl is one run; bench/ppo_table.py turns them into the README table and
# the `ppo_trl011` entry of bench/results.json. shomin runs three times per base: without gradient
# checkpointing, with it (`gradient_checkpointing: true`, as imdb-rlhf ships it) and with only each
# layer's norm + MLP and attention recomputed (`gradient_checkpointing: selective`). The 4-bit base
# runs shomin's Triton 4-bit GEMMs (`model.int4_matmul: triton`, CUDA + Triton; BENCH_INT4=bitsandbytes
# for bitsandbytes' layer, the default of the setting).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TRL011:?set TRL011 to ../shared/bench/trl011_ppo.py}" "${TRL011_SITE:?set TRL011_SITE}"
STEPS=${1:-4} QUANTS=${2:-"8bit 4bit"}
export BENCH_DIR=${BENCH_DIR:-/tmp/bench} OUT=${OUT:-bench/out} BENCH_INT4=${BENCH_INT4:-triton}
mkdir -p "$OUT" "$BENCH_DIR"
for q in $QUANTS; do
  # shomin first: it writes the checkpoint ($BENCH_DIR/ppo_neox20b, fp16 + tokenizer.json) once
  python3 bench/gpu_ppo.py neox20b "$q" 16 16 "$STEPS" | grep '^{"arch"' | tee -a "$OUT/ppo_trl011.jsonl"
  python3 bench/gpu_ppo.py neox20b "$q" 16 16 "$STEPS" checkpointing | grep '^{"arch"' | tee -a "$OUT/ppo_trl011.jsonl"
  python3 bench/gpu_ppo.py neox20b "$q" 16 16 "$STEPS" selective | grep '^{"arch"' | tee -a "$OUT/ppo_trl011.jsonl"
  PYTHONPATH="$TRL011_SITE" python3 "$TRL011" "$BENCH_DIR/ppo_neox20b" "$q" "$STEPS" | grep '^{"impl"' \
    | tee -a "$OUT/ppo_trl011.jsonl"
done
python3 bench/ppo_table.py "$OUT/ppo_trl011.jsonl"
