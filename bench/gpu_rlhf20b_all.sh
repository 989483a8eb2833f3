#!/usr/bin/env bash
# Issue 11's measurements in one command, on one H100-class GPU (about 20 minutes; ~45 GB of
# disk and ~45 GB of RAM disk at a time):
#   1. the PPO table: shomin's PPO stage (with gradient checkpointing, as imdb-rlhf ships
#      it, without, and `selective`; the 4-bit base on `int4_matmul: triton`) and seed 003's recipe (TRL 0.11.4 + PEFT, ../shared/bench/trl011_ppo.py)
#      side by side on one random gpt-neox-20b checkpoint, 8-bit and 4-bit base
#      (bench/gpu_ppo_trl011.sh, bench/ppo_table.py);
#   2. the whole imdb-rlhf chain at that shape through the real CLI, held to 22.4 GiB
#      (bench/gpu_rlhf20b.py), once the PPO checkpoint is deleted to make room.
# Writes $RES/ppo_trl011.jsonl, $RES/rlhf20b.json, $RES/results.json (bench/results.json with
# the `ppo_trl011` and `rlhf20b_chain` entries replaced) and $RES/done.
#
#   TRL011=../shared/bench/trl011_ppo.py TRL011_SITE=/path/to/trl011-stack RES=/tmp/res \
#     bash bench/gpu_rlhf20b_all.sh [STEPS]
# Long for one terminal: start it with `setsid nohup ... &` and follow $RES/log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${TRL011:?set TRL011}" "${TRL011_SITE:?set TRL011_SITE}"
STEPS=${1:-4}
export BENCH_DIR=${BENCH_DIR:-/tmp/bench} RES=${RES:-bench/out} RUNS=${RUNS:-/dev/shm/runs}
mkdir -p "$BENCH_DIR" "$RES"
OUT="$RES" bash bench/gpu_ppo_trl011.sh "$STEPS" 2>>"$RES/err.txt"
rm -rf "$BENCH_DIR/ppo_neox20b"
python3 bench/gpu_rlhf20b.py --work "$BENCH_DIR" --runs "$RUNS" --set stages.env_check.headroom=1.0 2>>"$RES/err.txt" \
  | tail -20
cp "$BENCH_DIR/rlhf20b.json" "$RES/" 2>/dev/null
cp bench/results.json "$RES/results.json"
python3 bench/ppo_table.py "$RES/ppo_trl011.jsonl" --results "$RES/results.json" > /dev/null
python3 - "$RES" <<'PY'
import json, sys, time
from pathlib import Path
res = Path(sys.argv[1])
results = json.loads((res / "results.json").read_text())
chain = res / "rlhf20b.json"
if chain.exists():
    import torch
    results["rlhf20b_chain"] = {"command": "bash bench/gpu_rlhf20b_all.sh (python bench/gpu_rlhf20b.py --runs /dev/shm/runs "
                                "--set stages.env_check.headroom=1.0)", "date": time.strftime("%Y-%m-%d"),
                                "gpu": torch.cuda.get_device_name(0), **json.loads(chain.read_text())}
(res / "results.json").write_text(json.dumps(results, indent=2) + "\n")
PY
echo done > "$RES/done"
