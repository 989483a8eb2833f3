"""The fault matrix: each fault injected for real, one line per fault (injected, survived, nothing lost).

    .venv/bin/python bench/faults.py matrix           # the fast faults, as make test runs them
    .venv/bin/python bench/faults.py sweep --kills 50 # SIGKILL at random moments, then the same command

`matrix` runs the fault tests of tests/ (each injects its fault for real: a tmpfs that
fills, a file removed from a cached stage, a tracking server that dies, ...) and prints
one line per fault with its outcome.

`sweep` is the long one. It runs a shortened `imdb-rlhf-local` (the embedded model,
every stage, a few steps each; `SHORT` below) once without faults, as the reference,
then in fresh working folders (a fresh model cache too, so the conversion is killed as
well) starts the same command again and again, killing its whole process group with
SIGKILL after a random (seeded) delay, until a run finishes. Each finished chain is
checked against the reference: every stage completed or came from the cache, no run
is left `running` (killed ones read `interrupted`, naming the stage), every weight file
loads and is bit-equal to the reference's, eval.json's figures are equal. Where each
kill landed (stage, or before the run folder existed) is counted.

A benchmark, not a test: it prints and writes bench/results_faults.json; exit 1 when a
chain lost something. Run it alone: two PyTorch processes on a 2-core CPU slow each
other many times over.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "imdb-rlhf-local"
SHORT = [  # every stage of imdb-rlhf-local, a few steps each, a checkpoint after every step
    "stages.sft.max_steps=4", "stages.sft.save_steps=1", "stages.sft.logging_steps=1",
    "stages.sft.batch_size=4", "stages.sft.max_seq_length=48",
    "stages.ppo.steps=4", "stages.ppo.save_steps=1", "stages.ppo.batch_size=2", "stages.ppo.mini_batch_size=2",
    "stages.ppo.ppo_epochs=1",
    "stages.evaluate.max_rows=4", "stages.evaluate.num_prompts=1", "stages.evaluate.max_new_tokens=8",
    "stages.evaluate.reward_prompts=2", "stages.evaluate.samples_per_query=2",
]
# the tests that inject the fast faults, and what each one injects
MATRIX = {
    "tests/test_resume.py::test_sigkill_during_sft_then_rerun_resumes": "SIGKILL during sft, rerun resumes",
    "tests/test_resume.py::test_last_checkpoint_skips_one_cut_off_mid_save": "checkpoint cut off mid-save",
    "tests/test_ppo.py::test_outputs_load_and_training_resumes_exactly": "ppo killed, resumes bit-equal",
    "tests/test_faults.py::test_a_full_disk_fails_with_one_line_and_the_same_command_then_finishes": "disk full",
    "tests/test_resume.py::test_a_full_disk_during_a_checkpoint_save_leaves_no_half_checkpoint":
        "disk full during a checkpoint save",
    "tests/test_faults.py::test_a_cached_stage_with_a_damaged_folder_is_recomputed": "cached stage damaged",
    "tests/test_faults.py::test_servers_dying_mid_run": "MLflow and Prefect servers die mid-run",
    "tests/test_faults.py::test_a_half_downloaded_snapshot_is_not_passed_on": "half-downloaded hub snapshot, offline",
    "tests/test_faults.py::test_online_a_half_downloaded_snapshot_is_fetched_again": "half-downloaded snapshot, online",
    "tests/test_embedded.py::test_a_half_converted_model_is_converted_again": "half-converted embedded model",
    "tests/test_bad_input.py::test_bad_input_is_refused_with_one_line": "bad input (every case)",
    "tests/test_ppo.py::test_two_concurrent_ppo_runs_with_the_same_inputs_keep_their_checkpoints": "two ppo runs at once",
    "tests/test_resume.py::test_checkpoint_lock_gives_a_concurrent_run_its_own_folder": "two sft runs at once",
    "tests/test_deploy.py::test_schedule_fires_and_completes_on_a_real_server": "serve outlives a failing run",
}


def shomin_cmd() -> list[str]:
    return [sys.executable, "-m", "shomin.flows.cli", "run", "-f", str(ROOT / "pipelines.yaml"), PIPELINE,
            *[a for kv in SHORT for a in ("--set", kv)]]


def fresh_workdir(parent: Path, name: str) -> tuple[Path, dict]:
    work = parent / name
    work.mkdir(parents=True)
    (work / "data").symlink_to(ROOT / "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
    env |= {"SHOMIN_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "SHOMIN_QUIET": "1", "TQDM_DISABLE": "1",
            "PYTHONPATH": str(ROOT)}
    return work, env


def start(work: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(shomin_cmd(), cwd=work, env=env, stdin=subprocess.DEVNULL,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def runs_of(work: Path) -> list[dict]:
    out = []
    for p in sorted((work / "runs" / PIPELINE).glob("*/summary.json")):
        out.append(json.loads(p.read_text()))
    return out


def fingerprint(run: Path) -> dict[str, str]:
    """sha256 of every weight file of a finished run, and eval.json's figures."""
    out = {}
    for stage in sorted(p for p in run.iterdir() if p.is_dir()):   # a cached stage's folder is a link
        for f in sorted(stage.resolve().rglob("*.safetensors")):
            name = f"{stage.name}/{f.relative_to(stage.resolve()).as_posix()}"
            out[name] = hashlib.sha256(f.read_bytes()).hexdigest()
    report = json.loads((run / "evaluate" / "eval.json").read_text())
    numbers = {k: v for k, v in report.items() if isinstance(v, (int, float))}
    out["eval.json figures"] = hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()
    return out


def loads(run: Path) -> None:
    """Every weight folder of the run loads with plain transformers/peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(run / "merge" / "model", dtype=torch.float32)
    PeftModel.from_pretrained(merged, run / "ppo" / "adapter")


def finished_run(work: Path) -> Path:
    done = [s for s in runs_of(work) if s["status"] == "completed"]
    return work / "runs" / PIPELINE / done[-1]["run_id"]


def reference(parent: Path) -> tuple[dict, float, dict]:
    """The uninterrupted run: its fingerprint, its wall seconds and each stage's seconds (an
    earlier reference in the same folder is reused)."""
    work = parent / "reference"
    if not (work / "seconds.json").exists():
        shutil.rmtree(work, ignore_errors=True)
        work, env = fresh_workdir(parent, "reference")
        t0 = time.monotonic()
        proc = start(work, env, work / "log.txt")
        if proc.wait() != 0:
            sys.exit(f"reference run failed; see {work / 'log.txt'}")
        (work / "seconds.json").write_text(json.dumps(time.monotonic() - t0))
    run = finished_run(work)
    loads(run)
    stages = {k: v.get("seconds", 0.0) for k, v in json.loads((run / "summary.json").read_text())["stages"].items()}
    return fingerprint(run), json.loads((work / "seconds.json").read_text()), stages


def remaining_s(work: Path, total_s: float, stage_s: dict) -> float:
    """How long the next run of the command should take: its start-up and every stage the last
    run did not finish (finished ones come from the cache). Kills are drawn within it, so
    they land across every stage rather than mostly in the first ones."""
    summaries = runs_of(work)
    done = {k for k, v in (summaries[-1]["stages"] if summaries else {}).items()
            if v["status"] in ("completed", "cached") and k != "env_check"}
    startup = max(total_s - sum(stage_s.values()), 5.0)
    return startup + sum(v for k, v in stage_s.items() if k not in done)


def chain(parent: Path, index: int, rng: random.Random, timing: tuple[float, dict], ref: dict) -> dict:
    """Kill the command at random moments until a run of it finishes; check what it left."""
    work, env = fresh_workdir(parent, f"chain-{index:02d}")
    kills, landed, uncut_s = 0, [], None
    while True:
        delay = rng.uniform(1.0, remaining_s(work, *timing))
        t0 = time.monotonic()
        proc = start(work, env, work / "log.txt")
        try:
            code = proc.wait(timeout=delay)
            uncut_s = time.monotonic() - t0 if not kills else None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            landed.append(None)   # filled in below from the summaries the next run settles
            continue
        break
    # `shomin runs` settles killed runs (as a new run does); every killed run must read interrupted
    subprocess.run([sys.executable, "-m", "shomin.flows.cli", "runs", "-f", str(ROOT / "pipelines.yaml"), PIPELINE],
                   cwd=work, env=env, capture_output=True, timeout=300)
    summaries = runs_of(work)
    stuck = [s["run_id"] for s in summaries if s["status"] == "running"]
    where = [s.get("interrupted_stage") or "start of run" for s in summaries if s["status"] == "interrupted"]
    where += ["before the run folder"] * (kills - len(where))
    problems = []
    if code != 0:
        problems.append(f"final run exited {code}")
    if stuck:
        problems.append(f"runs left 'running': {stuck}")
    if code == 0:
        final = summaries[-1]
        bad = [k for k, v in final["stages"].items() if v["status"] not in ("completed", "cached")]
        if bad:
            problems.append(f"stages not finished: {bad}")
        run = finished_run(work)
        try:
            loads(run)
        except Exception as e:  # noqa: BLE001 - reported, not raised
            problems.append(f"does not load: {type(e).__name__}: {e}")
        got = fingerprint(run)
        problems += [f"{k} differs from the reference" for k in ref if got.get(k) != ref[k]]
        resumed = {k: v["resumed_from_step"] for k, v in final["stages"].items() if v.get("resumed_from_step")}
    else:
        resumed = {}
    leftovers = [p.name for p in (work / "runs" / PIPELINE / ".checkpoints").glob("*")
                 if p.is_dir()] if (work / "runs" / PIPELINE / ".checkpoints").exists() else []
    if code == 0 and leftovers:
        problems.append(f"checkpoints left after success: {leftovers}")
    shutil.rmtree(work / "cache", ignore_errors=True)
    return {"chain": index, "kills": kills, "landed": where, "finished": code == 0, "resumed": resumed,
            "problems": problems, "uncut_s": uncut_s}


def sweep(args) -> int:
    rng = random.Random(args.seed)
    parent = Path(args.workdir or tempfile.mkdtemp(prefix="shomin-faults-"))
    parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    ref, ref_s, stage_s = reference(parent)
    print(f"reference: {PIPELINE} (shortened) finished in {ref_s:.0f}s; {len(ref)} files fingerprinted", flush=True)
    chains, kills, first = [], 0, len(list(parent.glob("chain-*")))
    while kills < args.kills:
        result = chain(parent, first + len(chains), rng, (ref_s, stage_s), ref)
        if result["uncut_s"] and result["uncut_s"] < ref_s:   # a whole run is faster now: kill sooner
            scale = result["uncut_s"] / ref_s
            ref_s, stage_s = result["uncut_s"], {k: v * scale for k, v in stage_s.items()}
        chains.append(result)
        kills += result["kills"]
        ok = "survived, nothing lost" if result["finished"] and not result["problems"] else "; ".join(result["problems"])
        print(f"chain {result['chain']:2d}: {result['kills']} kills ({', '.join(result['landed']) or '-'}); "
              f"resumed {result['resumed'] or '-'}: {ok}", flush=True)
    clean = sum(r["kills"] for r in chains if r["finished"] and not r["problems"])
    landed = collections.Counter(w for r in chains for w in r["landed"])
    summary = {"date": dt.date.today().isoformat(), "pipeline": PIPELINE, "overrides": SHORT, "seed": args.seed,
               "reference_s": round(ref_s, 1), "kills": kills, "kills_then_clean_finish": clean,
               "chains": len(chains), "landed": dict(landed), "wall_s": round(time.monotonic() - t0),
               "runs": chains}
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{kills} kills in {len(chains)} chains, {clean} followed by a clean finish; kills landed in: "
          + ", ".join(f"{k} {v}" for k, v in landed.most_common()) + f"; {summary['wall_s']}s")
    if not args.keep:
        shutil.rmtree(parent, ignore_errors=True)
    return 0 if clean == kills else 1


def matrix(args) -> int:
    """Each fault test once; one line per fault."""
    results = Path(tempfile.mkdtemp()) / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={results}",
                    *MATRIX], cwd=ROOT)
    import xml.etree.ElementTree as ET
    outcome = {}
    for case in ET.parse(results).getroot().iter("testcase"):
        name = f"{case.get('classname').replace('.', '/')}.py::{case.get('name').split('[')[0]}"
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        outcome[name] = "FAILED" if failed or outcome.get(name) == "FAILED" else ("skipped" if skipped else "ok")
    bad = 0
    for test, fault in MATRIX.items():
        state = outcome.get(test, "not run")
        bad += state != "ok"
        verdict = "injected, survived, nothing lost" if state == "ok" else state
        print(f"{fault:44} {verdict}")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("matrix", help="the fast faults (the tests that inject them)").set_defaults(fn=matrix)
    s = sub.add_parser("sweep", help="random SIGKILLs across every stage of imdb-rlhf-local")
    s.add_argument("--kills", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workdir", help="parent folder of the working folders (default: a temp folder)")
    s.add_argument("--keep", action="store_true", help="keep the working folders")
    s.add_argument("--out", default=str(ROOT / "bench" / "results_faults.json"))
    s.set_defaults(fn=sweep)
    args = ap.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
