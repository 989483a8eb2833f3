"""A pipeline over several seeds: every headline metric as mean ± spread across seeds.

Usage: python bench/seeds.py PIPELINE [--seeds 3] [--first 1] [--set KEY=VALUE ...] [--json FILE]

Each seed is one `shomin run PIPELINE --set seed=S` (the seed moves the data split, the
LoRA init and all sampling), run one after another in this folder. Prints, per metric,
the mean over seeds, the spread (sample standard deviation across seeds) and the mean
of the runs' own standard errors, so a reader sees both how much one run's figure moves
with its sampling and how much it moves with the seed. README "Benchmarks" takes its
learning figures from here, never from a single run.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HEADLINE = ("loss_before", "loss_after", "reward_sft", "reward_ppo", "reward_gain", "kl_ppo")


def run_seed(pipeline: str, seed: int, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "shomin.flows.cli", "run", pipeline, "--quiet", "--set", f"seed={seed}"]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"seed {seed} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("shomin: completed:"))
    summary = json.loads(Path(line.split(": ", 2)[2]).read_text())
    metrics = dict((summary["stages"].get("evaluate") or {}).get("metrics") or {})
    return {"seed": seed, "run_id": summary["run_id"], "seconds": round(time.time() - t0, 1), "metrics": metrics}


def summarise(runs: list[dict]) -> dict:
    out = {}
    names = [k for k in runs[0]["metrics"] if not k.endswith("_se")]
    for name in names:
        xs = [r["metrics"][name] for r in runs if name in r["metrics"]]
        m = sum(xs) / len(xs)
        spread = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
        ses = [r["metrics"][f"{name}_se"] for r in runs if f"{name}_se" in r["metrics"]]
        out[name] = {"mean": m, "spread": spread, "mean_se": sum(ses) / len(ses) if ses else None, "values": xs}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pipeline")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first", type=int, default=1)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--json", default=None, help="append each run, then the summary, as JSON lines to this file")
    args = ap.parse_args()
    runs = []
    for seed in range(args.first, args.first + args.seeds):
        runs.append(run_seed(args.pipeline, seed, args.set))
        print(json.dumps(runs[-1]), flush=True)
        if args.json:   # as it goes: a long sweep cut short keeps the seeds it finished
            with open(args.json, "a", encoding="utf-8") as f:
                f.write(json.dumps({"pipeline": args.pipeline, "overrides": args.set, **runs[-1]}) + "\n")
    table = summarise(runs)
    result = {"pipeline": args.pipeline, "seeds": [r["seed"] for r in runs], "overrides": args.set,
              "seconds_per_run": [r["seconds"] for r in runs], "metrics": table, "runs": runs}
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: v for k, v in result.items() if k != "runs"}) + "\n")
    print(f"\n{args.pipeline}, seeds {result['seeds']}: mean ± spread across seeds (mean of the runs' own SE)")
    for name in [n for n in HEADLINE if n in table] + [n for n in table if n not in HEADLINE]:
        t = table[name]
        se = "" if t["mean_se"] is None else f"  (run SE {t['mean_se']:.3f})"
        print(f"  {name:22} {t['mean']:9.4f} ± {t['spread']:.4f}{se}")


if __name__ == "__main__":
    main()
