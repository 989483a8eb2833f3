"""MLflow, as people compare runs: a local run leaves PNG plots, an eval table, tags and (with
`tracking.register: true`) a model version, read back here with MlflowClient."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny_chain

PNG = b"\x89PNG\r\n\x1a\n"
SFT = "max_steps: 3, batch_size: 4, micro_batch_size: 4, max_seq_length: 48, learning_rate: 0.01, save_steps: 3, logging_steps: 1"
# 160 tokens: the byte-level tiny tokenizer needs that many to reach a Japanese answer (48 scored nothing)
EVALUATE = "max_rows: 4, num_prompts: 2, max_new_tokens: 4, max_seq_length: 160"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_local_run_has_plots_tables_tags_and_model_version(tmp_path, tiny_model):
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(tiny_chain(tiny_model, sft=SFT, evaluate=EVALUATE, extra="tracking: {register: true}"))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    r = subprocess.run([sys.executable, "-m", "shomin.flows.cli", "run", "tiny"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=200, env=env | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = (tmp_path / "runs" / "tiny").glob("*/summary.json")
    summary = json.loads(path.read_text())

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    parent = client.get_run(summary["mlflow_run_id"])
    children = {c.data.tags["stage"]: c for c in client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert set(children) == {"env_check", "model_init", "dataset", "sft", "merge", "evaluate"}

    # tags people filter on
    for run in [parent, *children.values()]:
        tags = run.data.tags
        assert tags["pipeline"] == "tiny" and tags["seed"] == "42" and tags["run_id"] == summary["run_id"]
        assert tags.get("git_commit")
    assert all(c.data.tags["stage"] == s for s, c in children.items())
    assert parent.data.tags["prefect_flow_run_id"] == summary["prefect_flow_run_id"]

    # curves as step metrics and as a PNG on the stage run
    sft = children["sft"].info.run_id
    assert [m.step for m in client.get_metric_history(sft, "curve/loss")] == [1, 2, 3]
    assert len(client.get_metric_history(sft, "curve/learning_rate")) == 3
    assert [a.path for a in client.list_artifacts(sft, "plots")] == ["plots/sft_curves.png"]
    png = client.download_artifacts(sft, "plots/sft_curves.png", str(tmp_path / "dl"))
    data = open(png, "rb").read()
    assert data[:8] == PNG and len(data) > 10_000

    # the eval table as an MLflow table, on the evaluate run and the parent
    report = json.loads(open(summary["stages"]["evaluate"]["artifacts"]["eval_json"]).read())
    for rid in (children["evaluate"].info.run_id, parent.info.run_id):
        table = client.load_table(exp.experiment_id, "eval_table.json", run_ids=[rid])
        rows = {row["metric"]: row for row in table.to_dict("records")}
        assert rows["loss"]["before"] == pytest.approx(report["loss_before"], abs=1e-4)
        assert rows["loss"]["after"] == pytest.approx(report["loss_after"], abs=1e-4)
        gens = client.load_table(exp.experiment_id, "generations.json", run_ids=[rid])
        assert list(gens.columns)[:3] == ["prompt", "before", "after"] and len(gens) == 2

    # register: true -> the merged model is a version of model "tiny"
    (mv,) = client.search_model_versions("name = 'tiny'")
    assert mv.run_id == children["merge"].info.run_id and mv.tags["kind"] == "merged-model"
    assert mv.source.startswith(f"runs:/{mv.run_id}/") or mv.source.startswith("file:")
    assert parent.data.tags["registered_model"] == f"tiny/{mv.version}"


def test_ppo_plot_eval_rows_and_sparkline(tmp_path):
    from shomin.flows.artifacts import PPO_CURVES, artifact_key, eval_rows, plot_curves, sparkline
    log = [{"step": i, "reward_mean": 0.1 * i, "reward_std": 0.05, "kl": 0.01 * i * i, "kl_coef": 0.2,
            "entropy": 3.0 - 0.1 * i} for i in range(1, 11)]
    png = plot_curves(log, PPO_CURVES, "demo ppo", tmp_path / "ppo.png")
    assert png.read_bytes()[:8] == PNG
    assert plot_curves([{"step": 1}], PPO_CURVES, "nothing", tmp_path / "none.png") is None
    rows = eval_rows({"loss_before": 2.0, "loss_after": 1.5, "perplexity_before": 7.4, "perplexity_after": 4.5,
                      "reward_sft": 0.1, "reward_ppo": 0.6, "kl_ppo": 0.3, "n_eval_rows": 8})
    assert [r["metric"] for r in rows] == ["loss", "perplexity", "reward", "kl_to_reference", "eval_rows"]
    assert rows[2] == {"metric": "reward", "before": 0.1, "after": 0.6}
    assert sparkline([1, 2, 3, 4]) == "▁▃▆█" and sparkline([]) == ""
    assert artifact_key("imdb_rlhf.Local", "evaluation") == "imdb-rlhf-local-evaluation"
