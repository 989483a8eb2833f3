#!/usr/bin/env bash
# The PPO stage on 1 GPU and data-parallel under `accelerate launch` on N GPUs (one model copy
# per GPU, each process samples its own queries; rewards, KL and the KL controller gathered
# across processes, early stop agreed). Two ways to use N GPUs: the same 16 queries a step
# split across them, and 16 per GPU (N times the rollouts a step).
# Usage: bash bench/gpu_ppo_multi.sh ARCH QUANT QUERIES NEW_TOKENS STEPS N
# Prints the three JSON lines of bench/gpu_ppo.py and a summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=$1 QUANT=$2 Q=$3 NEW=$4 STEPS=$5 N=$6
export BENCH_DIR=${BENCH_DIR:-/tmp/bench} TQDM_DISABLE=1
mkdir -p "$BENCH_DIR"
# one GPU first: it writes the checkpoint the launched processes then share
one=$(CUDA_VISIBLE_DEVICES=0 python3 bench/gpu_ppo.py "$ARCH" "$QUANT" "$Q" "$NEW" "$STEPS" | grep '^{"arch"')
echo "$one"
split=$(accelerate launch --num_processes "$N" --multi_gpu bench/gpu_ppo.py "$ARCH" "$QUANT" $((Q / N)) "$NEW" "$STEPS" \
  | grep '^{"arch"')
echo "$split"
each=$(accelerate launch --num_processes "$N" --multi_gpu bench/gpu_ppo.py "$ARCH" "$QUANT" "$Q" "$NEW" "$STEPS" \
  | grep '^{"arch"')
echo "$each"
python3 - "$one" "$split" "$each" <<'PY'
import json, sys
one, split, each = (json.loads(x) for x in sys.argv[1:4])
print(json.dumps({"summary": True, "one_gpu_s_per_step": one["s_per_step"], "gpus": split["gpus"],
                  "split_s_per_step": split["s_per_step"], "split_speedup": round(one["s_per_step"] / split["s_per_step"], 2),
                  "each_s_per_step": each["s_per_step"],
                  "each_rollouts_per_s_ratio": round(each["gpus"] * one["s_per_step"] / each["s_per_step"], 2)}))
PY
