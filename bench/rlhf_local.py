"""End-to-end benchmark of `imdb-rlhf-local` (the `make demo` pipeline) on the CPU.

Runs `shomin run imdb-rlhf-local` as a subprocess in a fresh working folder (so every
stage runs, a Prefect throwaway server and an MLflow database are created, exactly as
`make demo` on a fresh clone), then reads the run's summary.json and evaluate/eval.json and
reports the acceptance numbers of the PPO stage:

    reward_sft, reward_ppo   mean VADER compound on held-out queries, SFT model vs PPO policy
    delta                    reward_ppo - reward_sft           (pass: >= +0.3)
    kl_ppo                   mean KL(policy || SFT), nats      (pass: <= 8)
    ppo_s, total_s           PPO stage seconds, whole command wall seconds

Prints one JSON line and a short table; writes bench/results_rlhf_local.json.
A benchmark, never a test: it asserts nothing and exits 0 even when the bar is missed
(exit 1 only when the pipeline itself fails).

Usage:
    .venv/bin/python bench/rlhf_local.py [--workdir DIR] [--keep] [--set KEY=VALUE ...]

Two PyTorch processes on a small CPU slow each other down badly: run it alone.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "imdb-rlhf-local"
MIN_DELTA, MAX_KL = 0.3, 8.0


def shomin_exe() -> str:
    exe = Path(sys.executable).with_name("shomin")
    return str(exe) if exe.exists() else str(ROOT / ".venv" / "bin" / "shomin")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", help="working folder for the run (default: a fresh temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the temp working folder")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to shomin run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results_rlhf_local.json"))
    args = ap.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="shomin-rlhf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data").exists():  # pipelines.yaml names data/movie-reviews.jsonl relative to the working folder
        (work / "data").symlink_to(ROOT / "data")
    cmd = [shomin_exe(), "run", "-f", str(ROOT / "pipelines.yaml"), PIPELINE, "--refresh"]
    for kv in args.set:
        cmd += ["--set", kv]
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    print("$ cd", work, "&&", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=work, env=env)
    total_s = time.time() - t0

    summaries = sorted((work / "runs" / PIPELINE).glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    if proc.returncode != 0 or not summaries:
        print(json.dumps({"pipeline": PIPELINE, "status": "failed", "returncode": proc.returncode,
                          "total_s": round(total_s, 1), "workdir": str(work)}))
        return 1
    summary = json.loads(summaries[-1].read_text())
    stages = summary["stages"]
    ev = json.loads(Path(stages["evaluate"]["artifacts"]["eval_json"]).read_text())
    ppo_log = json.loads(Path(stages["ppo"]["artifacts"]["ppo_log"]).read_text())
    delta = ev["reward_ppo"] - ev["reward_sft"]
    result = {
        "pipeline": PIPELINE,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(cmd),
        "overrides": args.set,
        "reward_sft": round(ev["reward_sft"], 4),
        "reward_ppo": round(ev["reward_ppo"], 4),
        "delta": round(delta, 4),
        "kl_ppo": round(ev["kl_ppo"], 3),
        "n_reward_prompts": len(ev.get("rlhf_samples", [])),
        "loss_before": round(ev.get("loss_before", float("nan")), 4),
        "loss_after": round(ev.get("loss_after", float("nan")), 4),
        "ppo_steps": len(ppo_log),
        "ppo_train_reward_first": round(ppo_log[0]["reward_mean"], 4) if ppo_log else None,
        "ppo_train_reward_last3": round(sum(e["reward_mean"] for e in ppo_log[-3:]) / max(len(ppo_log[-3:]), 1), 4),
        "stage_s": {k: round(v.get("seconds") or 0.0, 1) for k, v in stages.items()},
        "ppo_s": round(stages["ppo"].get("seconds") or 0.0, 1),
        "total_s": round(total_s, 1),
        "pass_delta": delta >= MIN_DELTA,
        "pass_kl": ev["kl_ppo"] <= MAX_KL,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "run_dir": str(summaries[-1].parent),
    }
    result["pass"] = result["pass_delta"] and result["pass_kl"]
    print(json.dumps(result))
    rows = [("reward_sft", f"{result['reward_sft']:+.3f}", ""),
            ("reward_ppo", f"{result['reward_ppo']:+.3f}", ""),
            ("delta", f"{result['delta']:+.3f}", f">= +{MIN_DELTA}  {'PASS' if result['pass_delta'] else 'FAIL'}"),
            ("kl_ppo (nats)", f"{result['kl_ppo']:.2f}", f"<= {MAX_KL:g}  {'PASS' if result['pass_kl'] else 'FAIL'}"),
            ("ppo stage (s)", f"{result['ppo_s']:.0f}", f"{result['ppo_steps']} steps"),
            ("total (s)", f"{result['total_s']:.0f}", "whole `shomin run`, wall")]
    print(f"{'metric':15} {'value':>8}  bar")
    for name, value, bar in rows:
        print(f"{name:15} {value:>8}  {bar}")
    print(f"overall: {'PASS' if result['pass'] else 'FAIL'}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if not args.workdir and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
