"""PPO vs GRPO vs RLOO vs DPO on the same preference data, at about equal wall time (CPU).

Every method starts from the same SFT model of `prefs-rlhf-local` (embedded SmolLM2-135M,
SFT on the chosen answers of data/prefs-reviews.jsonl, fp16 merge):

    ppo    the shipped prefs-rlhf-local: LoRA reward model on the pairs, PPO against it
    grpo   the same reward model, GRPO instead of PPO (TRL GRPOTrainer)
    rloo   the same reward model, RLOO (TRL RLOOTrainer)
    dpo    the shipped prefs-dpo-local: DPO on the pairs, no reward model

The pipelines are the shipped ones with the RL stage swapped and the step counts set by
`--steps` (chosen so that each method's own stage takes about the same seconds on this
CPU); they are written to the working folder's pipelines.yaml and run through the real
CLI (Prefect + MLflow), one working folder per seed, so SFT, merge and the reward model
are computed once per seed and cached for the other methods.

Judged on held-out prompts by VADER, which none of them was trained on (the pairs were
written so that the chosen answer is the warmer one), and, for the reward-trained
methods, by the run's own reward model. KL is to the SFT model (nats per response),
sampled as each stage sampled. Preference accuracy: held-out pairs that the policy's
implicit reward (log-ratio to the SFT model) orders as the data does.

    .venv/bin/python bench/prefs_compare.py [--seeds 0 1] [--methods ppo grpo rloo dpo]
                                            [--steps ppo=32,grpo=..,rloo=..,dpo=..]

Writes bench/results_prefs.json and prints the README table. A benchmark: it asserts
nothing. Two PyTorch processes on a 2-core CPU slow each other down many times: run alone.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ppo", "grpo", "rloo", "dpo")
# Steps per method, set so that each stage takes about as long as 16 PPO steps (~250 s)
# on an idle 2-core CPU (calibrated with --steps ppo=4,grpo=4,rloo=4,dpo=4; see README).
DEFAULT_STEPS = {"ppo": 16, "grpo": 30, "rloo": 30, "dpo": 20}


def pipelines(steps: dict[str, int]) -> dict[str, dict]:
    """The four pipelines, built from the shipped ones so that SFT, merge and the reward
    model are the same settings (and so the same cache entries) for every method."""
    shipped = yaml.safe_load((ROOT / "pipelines.yaml").read_text())["pipelines"]
    rlhf, dpo = shipped["prefs-rlhf-local"], shipped["prefs-dpo-local"]
    out = {}
    ppo = copy.deepcopy(rlhf)
    ppo["stages"]["ppo"]["steps"] = steps["ppo"]
    out["ppo"] = ppo
    ppo_stage = rlhf["stages"]["ppo"]
    for algorithm in ("grpo", "rloo"):
        p = copy.deepcopy(rlhf)
        stages = {k: v for k, v in p["stages"].items() if k != "ppo"}
        stages["grpo"] = {"algorithm": algorithm, "reward": {"kind": "trained"}, "steps": steps[algorithm],
                          "batch_size": 4, "num_generations": 4, "learning_rate": ppo_stage["learning_rate"],
                          "beta": ppo_stage["init_kl_coef"], "response_max_tokens": 16}
        stages["evaluate"] = stages.pop("evaluate")   # keep evaluate last
        p["stages"] = stages
        out[algorithm] = p
    d = copy.deepcopy(dpo)
    d["stages"]["dpo"]["max_steps"] = steps["dpo"]
    d["stages"]["dpo"]["epochs"] = 100   # max_steps decides
    out["dpo"] = d
    for name, p in out.items():
        p["description"] = f"bench/prefs_compare.py: {name} on data/prefs-reviews.jsonl"
        p.pop("schedule", None)
    return out


def shomin_exe() -> str:
    exe = Path(sys.executable).with_name("shomin")
    return str(exe) if exe.exists() else str(ROOT / ".venv" / "bin" / "shomin")


def run_one(work: Path, method: str, seed: int) -> dict:
    """`shomin run` of one method; its figures from summary.json and eval.json."""
    cmd = [shomin_exe(), "run", f"cmp-{method}", "--set", f"seed={seed}", "--quiet"]
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    print(f"$ cd {work} && {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=work, env=env)
    wall = time.time() - t0
    runs = sorted((work / "runs" / f"cmp-{method}").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    if proc.returncode != 0 or not runs:
        return {"method": method, "seed": seed, "status": "failed", "returncode": proc.returncode}
    stages = json.loads(runs[-1].read_text())["stages"]
    ev = json.loads(Path(stages["evaluate"]["artifacts"]["eval_json"]).read_text())
    stage = "grpo" if method == "rloo" else method
    row = {"method": method, "seed": seed, "status": "ok", "stage_s": round(stages[stage]["seconds"], 1),
           "wall_s": round(wall, 1), "run_dir": str(runs[-1].parent.relative_to(work))}
    for key in ("judge_sft", "judge_ppo", "judge_gain", "judge_gain_se", "reward_sft", "reward_ppo", "reward_gain",
                "reward_gain_se", "kl_ppo", "kl_ppo_se", "pref_accuracy", "pref_margin", "n_pairs", "n_queries"):
        if key in ev:
            row[key] = round(ev[key], 4)
    if "reward_model" in stages:
        row["rm_accuracy"] = round(stages["reward_model"]["metrics"].get("accuracy", float("nan")), 4)
        row["rm_margin"] = round(stages["reward_model"]["metrics"].get("margin", float("nan")), 4)
    if method == "dpo":
        m = stages["dpo"]["metrics"]
        row.update({k: round(m[k], 4) for k in ("accuracy", "margin", "margin_before", "margin_gain") if k in m})
    return row


def table(rows: list[dict]) -> str:
    """The README table: each method's mean over seeds, and each seed's figures."""
    def cell(name, key, fmt):
        vals = [r[key] for r in rows if r["method"] == name and r.get(key) is not None]
        if not vals:
            return "—"
        each = " / ".join(fmt.format(v) for v in vals)
        return f"{fmt.format(statistics.fmean(vals))} ({each})" if len(vals) > 1 else each
    lines = ["| method | VADER gain (judge) | trained-reward gain | KL to SFT, nats | held-out pref. accuracy | "
             "stage seconds |", "|---|---:|---:|---:|---:|---:|"]
    for name in METHODS:
        if any(r["method"] == name for r in rows):
            lines.append(f"| {name} | {cell(name, 'judge_gain', '{:+.3f}')} | {cell(name, 'reward_gain', '{:+.3f}')} | "
                         f"{cell(name, 'kl_ppo', '{:.2f}')} | {cell(name, 'pref_accuracy', '{:.2f}')} | "
                         f"{cell(name, 'stage_s', '{:.0f}')} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--steps", default="", help="e.g. ppo=32,grpo=48 (others keep their defaults)")
    ap.add_argument("--workdir", help="parent of the per-seed working folders (default: a temp folder)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results_prefs.json"))
    args = ap.parse_args()
    steps = dict(DEFAULT_STEPS)
    for kv in filter(None, args.steps.split(",")):
        k, v = kv.split("=")
        steps[k] = int(v)
    parent = Path(args.workdir or tempfile.mkdtemp(prefix="shomin-prefs-bench-"))
    rows = []
    for seed in args.seeds:
        work = parent / f"seed{seed}"
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "data").exists():
            (work / "data").symlink_to(ROOT / "data")
        named = {f"cmp-{k}": v for k, v in pipelines(steps).items()}
        (work / "pipelines.yaml").write_text(yaml.safe_dump({"pipelines": named}, sort_keys=False))
        for method in args.methods:
            rows.append(run_one(work, method, seed))
            print(json.dumps(rows[-1]), flush=True)
    result = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "python bench/prefs_compare.py " + " ".join(sys.argv[1:]),
              "steps": steps, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
              "rows": rows, "table": table(rows)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"])
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
