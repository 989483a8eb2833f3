#!/usr/bin/env bash
# The PPO stage's levers on the gpt-neox-20b shape, one H100: the GPU checks of the kernels
# (bench/gpu_check_kernels.py, incl. the weight-only 8-bit layers against fp16 and LLM.int8),
# a profile of one update mini-batch (wall vs kernel time), then PPO steps of the 8-bit base
# with and without gradient checkpointing and of the 4-bit base. Lines go to $RES/*.jsonl.
#   RES=/tmp/res bash bench/gpu_ppo_levers.sh [STEPS]
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-3}
export BENCH_DIR=${BENCH_DIR:-/tmp/bench} RES=${RES:-bench/out} TQDM_DISABLE=1
mkdir -p "$BENCH_DIR" "$RES"
timeout 300 python3 bench/gpu_check_kernels.py > "$RES/check.txt" 2>&1
ppo() { timeout 400 python3 bench/gpu_ppo.py neox20b "$@" 2>>"$RES/ppo_err.txt" | grep '^{"arch"' >> "$RES/ppo.jsonl"; }
ppo 8bit 16 16 "$STEPS"          # writes the checkpoint first
timeout 300 python3 bench/gpu_ppo_profile.py 8bit > "$RES/profile.txt" 2>&1
ppo 8bit 16 16 "$STEPS" checkpointing
ppo 4bit 16 16 "$STEPS"
timeout 300 python3 bench/gpu_ppo_profile.py 4bit >> "$RES/profile.txt" 2>&1
ppo 4bit 16 16 "$STEPS" checkpointing
echo done > "$RES/done"
