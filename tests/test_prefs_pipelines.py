"""The shipped preference pipelines, end to end through the real CLI, Prefect and MLflow, on the
embedded model (shortened with --set): prefs-rlhf-local (SFT -> reward model -> PPO against it),
prefs-dpo-local (SFT -> DPO) and imdb-grpo-local (SFT -> GRPO vs VADER). Their outputs load
with plain transformers/peft, and evaluate judges each policy the same way."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

SHORT = {
    "sft": ["max_steps=2", "batch_size=4", "micro_batch_size=4", "save_steps=2"],
    "reward_model": ["max_steps=4", "batch_size=4", "micro_batch_size=4", "save_steps=2"],
    "ppo": ["steps=2", "batch_size=4", "mini_batch_size=4", "ppo_epochs=1", "save_steps=2"],
    "dpo": ["max_steps=3", "batch_size=4", "micro_batch_size=4", "save_steps=2"],
    "grpo": ["steps=2", "batch_size=2", "num_generations=2", "save_steps=2"],
    "evaluate": ["max_rows=4", "num_prompts=1", "max_new_tokens=8", "reward_prompts=2", "samples_per_query=1",
                 "preference_pairs=4"],
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One working folder for the module, as a user's project: the embedded model is converted
    once, and prefs-dpo-local finds the SFT and merge of prefs-rlhf-local (the same data and
    settings) in the cache."""
    work = tmp_path_factory.mktemp("prefs")
    (work / "data").symlink_to(ROOT / "data")
    return work


def run_shipped(pipeline: str, tmp_path: Path) -> tuple[Path, dict]:
    cache = os.environ.get("SHOMIN_TEST_CACHE") or str(tmp_path / "cache")
    stages = {"prefs-rlhf-local": ("sft", "reward_model", "ppo", "evaluate"),
              "prefs-dpo-local": ("sft", "dpo", "evaluate"), "imdb-grpo-local": ("sft", "grpo", "evaluate")}[pipeline]
    sets = [a for s in stages for kv in SHORT[s] for a in ("--set", f"stages.{s}.{kv}")]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_HOME")} | {
        "PYTHONPATH": str(ROOT), "SHOMIN_CACHE": cache, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    r = subprocess.run([sys.executable, "-m", "shomin.flows.cli", "run", "-f", str(ROOT / "pipelines.yaml"), pipeline,
                        *sets], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = [s.parent for s in (tmp_path / "runs" / pipeline).glob("*/summary.json")]   # one run per pipeline
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["stages"][stages[-2]]["status"] == "completed"
    assert all(s["status"] in ("completed", "cached") for s in summary["stages"].values())
    return run, summary


def stage_runs(tmp_path: Path, summary: dict) -> set[str]:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(summary["pipeline"])
    return {r.info.run_name for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("mlflow.parentRunId") == summary["mlflow_run_id"] and r.info.status == "FINISHED"}


def policy_loads(run: Path, stage: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(run / "merge" / "model", dtype=torch.float32)
    policy = PeftModel.from_pretrained(base, run / stage / "adapter")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in policy.named_parameters())   # it trained


def test_prefs_rlhf_local_trains_a_reward_model_and_ppo_against_it(workdir):
    run, summary = run_shipped("prefs-rlhf-local", workdir)
    assert {"sft", "reward_model", "ppo", "evaluate"} <= stage_runs(workdir, summary)
    rm = summary["stages"]["reward_model"]["metrics"]
    assert 0 <= rm["accuracy"] <= 1 and "margin_se" in rm
    from peft import AutoPeftModelForSequenceClassification
    from shomin.tasks.models.trained_reward import build_trained_reward
    folder = run / "reward_model" / "model"
    # float32, as shomin scores on the CPU (transformers 5 otherwise loads the merged model's own 16-bit dtype)
    plain = AutoPeftModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32).eval()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    plain.config.pad_token_id = tok.pad_token_id
    text = "The second half of this film builds to a tender finale."
    with torch.no_grad():
        direct = plain(**tok([text], return_tensors="pt")).logits[0, 0].item()
    assert abs(build_trained_reward(str(folder))([text])[0] - direct) < 1e-3
    policy_loads(run, "ppo")
    report = json.loads((run / "evaluate" / "eval.json").read_text())
    # judged by the trained reward model (its own) and by VADER (never seen), KL, held-out pairs
    for key in ("reward_sft", "reward_ppo", "reward_gain", "judge_sft", "judge_ppo", "judge_gain", "kl_ppo",
                "pref_accuracy", "pref_margin"):
        assert isinstance(report[key], float), key
    assert report["n_pairs"] == 4 and report["policy_stage"] == "ppo"
    assert "mean judge score" in (run / "evaluate" / "eval.md").read_text()


def test_prefs_dpo_local_runs_dpo_and_judges_it(workdir):
    run, summary = run_shipped("prefs-dpo-local", workdir)
    assert {"sft", "dpo", "evaluate"} <= stage_runs(workdir, summary)
    dpo = summary["stages"]["dpo"]["metrics"]
    assert dpo["accuracy_before"] == 0 and dpo["margin_before"] == 0   # reference = the adapter off
    policy_loads(run, "dpo")
    report = json.loads((run / "evaluate" / "eval.json").read_text())
    assert report["policy_stage"] == "dpo" and "reward_sft" not in report   # DPO trains on no reward
    for key in ("judge_gain", "kl_ppo", "pref_accuracy", "pref_margin"):
        assert isinstance(report[key], float), key


def test_imdb_grpo_local_runs_grpo_against_vader(workdir):
    run, summary = run_shipped("imdb-grpo-local", workdir)
    assert {"sft", "grpo", "evaluate"} <= stage_runs(workdir, summary)
    policy_loads(run, "grpo")
    report = json.loads((run / "evaluate" / "eval.json").read_text())
    assert report["policy_stage"] == "grpo" and "pref_accuracy" not in report   # text data: no pairs
    for key in ("reward_sft", "reward_ppo", "reward_gain", "kl_ppo"):
        assert isinstance(report[key], float), key
