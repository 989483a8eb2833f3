"""The whole chain as a real Prefect flow with real MLflow records, on a tiny random model."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, tiny_chain

SFT = "max_steps: 4, batch_size: 4, micro_batch_size: 4, max_seq_length: 64, learning_rate: 0.01, save_steps: 2, logging_steps: 1"
EVALUATE = "max_rows: 8, num_prompts: 2, max_new_tokens: 6, max_seq_length: 64"


def shomin(*args, cwd):
    # no MLFLOW_TRACKING_URI: the default, sqlite:///mlflow.db in the working folder, is what users get
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "shomin.flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def summaries(workdir):
    return sorted((workdir / "runs" / "tiny").glob("*/summary.json"))


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory, tiny_model):
    tmp_path = tmp_path_factory.mktemp("chain")
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(tiny_chain(tiny_model, sft=SFT, evaluate=EVALUATE))
    # --refresh: other tests in this session may have cached the same tiny stages already
    r = shomin("run", "tiny", "--refresh", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = summaries(tmp_path)
    return tmp_path, json.loads(path.read_text()), r


def test_chain_runs_records_and_caches(chain_run, tiny_model):
    workdir, summary, _ = chain_run
    stages = ["env_check", "model_init", "dataset", "sft", "merge", "evaluate"]
    assert summary["status"] == "completed" and list(summary["stages"]) == stages
    assert all(summary["stages"][s]["status"] == "completed" for s in stages)
    run_dir = workdir / "runs" / "tiny" / summary["run_id"]
    for s in stages:
        assert (run_dir / s).is_dir()
    assert not list(run_dir.glob(".*partial*"))
    arts = summary["stages"]
    assert Path(arts["sft"]["artifacts"]["adapter"]).is_dir()
    assert Path(arts["merge"]["artifacts"]["merged"]).is_dir()
    report = json.loads(Path(arts["evaluate"]["artifacts"]["eval_json"]).read_text())
    assert report["loss_after"] < report["loss_before"]   # lr 0.01 on a random model: SFT must help
    assert len(report["samples"]) == 2 and "after" in report["samples"][0]

    # MLflow: one parent, one child per stage, settings as params, curves as step metrics
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parent = client.get_run(summary["mlflow_run_id"])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(stages)
    sft_run = next(r for r in children if r.info.run_name == "sft")
    assert sft_run.data.params["learning_rate"] == "0.01"
    assert len(client.get_metric_history(sft_run.info.run_id, "curve/loss")) >= 2
    assert any(a.path == "adapter" for a in client.list_artifacts(sft_run.info.run_id))

    # Prefect: the flow run and one completed task run per stage
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort
    with get_client(sync_client=True) as pc:
        flow_run = pc.read_flow_run(summary["prefect_flow_run_id"])
        assert flow_run.state.is_completed()
        tasks = pc.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
                                  sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=50)
    assert sorted(t.name.rsplit("-", 1)[0] for t in tasks) == sorted(stages)
    assert all(t.state.is_completed() for t in tasks)

    # an immediate rerun skips every finished stage (env_check always looks at the machine again)
    r = shomin("run", "tiny", cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    second = json.loads(max(summaries(workdir), key=lambda p: json.loads(p.read_text())["started_at"] + p.parent.name).read_text())
    assert second["run_id"] != summary["run_id"]
    assert {s: e["status"] for s, e in second["stages"].items()} == {
        "env_check": "completed", "model_init": "cached", "dataset": "cached", "sft": "cached",
        "merge": "cached", "evaluate": "cached"}
    assert (workdir / "runs" / "tiny" / second["run_id"] / "sft" / "adapter").is_dir()


def test_merged_matches_base_plus_adapter(chain_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    _, summary, _ = chain_run
    adapter = summary["stages"]["sft"]["artifacts"]["adapter"]
    merged_dir = summary["stages"]["merge"]["artifacts"]["merged"]
    x = torch.randint(3, 200, (2, 12))
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        base_logits = base(x).logits
        peft_logits = PeftModel.from_pretrained(base, adapter)(x).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
        merged_logits = merged(x).logits
    from safetensors import safe_open
    with safe_open(str(Path(merged_dir) / "model.safetensors"), "pt") as f:   # saved at fp16, safetensors only
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert not list(Path(merged_dir).glob("*.bin"))
    assert (peft_logits - base_logits).abs().max() > 1e-3           # the adapter changed something
    assert torch.allclose(merged_logits, peft_logits, atol=2e-2, rtol=1e-2)  # fp16 rounding only


def test_user_mistake_inside_a_stage_is_not_retried(tmp_path, tiny_model):
    """A ConfigError raised inside a task fails at once: retries are for network hiccups."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "a", "input": "", "output": " "}\n', encoding="utf-8")
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(textwrap.dedent(f"""
        pipelines:
          bad:
            model: {{source: {tiny_model}}}
            dataset: {{source: {rows}}}
            stages: {{model_init: , dataset: }}
    """))
    # straight into the flow (the CLI's pre-checks would stop it earlier), in its own process so
    # MLflow's process-wide tracking URI does not leak into later tests
    code = ("from flows.pipeline import StageFailed, run_pipeline\n"
            "try:\n    run_pipeline('bad', 'pipelines.yaml')\n"
            "except StageFailed as e:\n    print('FAILED', type(e.error).__name__)\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "FAILED DataError" in r.stdout, r.stderr[-2000:]
    (summary,) = (tmp_path / "runs" / "bad").glob("*/summary.json")
    flow_run_id = json.loads(summary.read_text())["prefect_flow_run_id"]
    with get_client(sync_client=True) as pc:
        runs = pc.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                 sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=50)
    dataset_run = next(r for r in runs if r.name.startswith("dataset"))
    assert dataset_run.state.is_failed() and dataset_run.run_count == 1
