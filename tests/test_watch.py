"""Watching a run live: a tiny SFT -> merge -> PPO -> evaluate pipeline against a real Prefect
server on loopback, read back through Prefect's API, MLflow and `shomin runs --watch` while it
runs and after, and the flow-run page's Logs tab in headless Chromium (screenshot kept in
$SHOMIN_TEST_OUTPUT, default test-output/)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.browser import Browser, find_chromium
from tests.conftest import ROOT
from tests.test_ui import output_dir

PPO_STEPS = 16


def pipeline(model) -> str:
    return yaml.safe_dump({"pipelines": {"tiny": {
        "model": {"source": str(model)},
        "dataset": {"source": str(ROOT / "data" / "movie-reviews.jsonl"), "format": "text", "allow_extra_columns": True},
        "stages": {"env_check": None, "model_init": None, "dataset": None,
                   "sft": {"max_steps": 24, "batch_size": 4, "micro_batch_size": 4, "max_seq_length": 48,
                           "logging_steps": 1, "save_steps": 12},
                   "merge": {"dtype": "float32"},
                   "ppo": {"steps": PPO_STEPS, "batch_size": 4, "mini_batch_size": 4, "response_max_tokens": 6,
                           "reward": {"kind": "vader"}},
                   "evaluate": {"max_rows": 8, "num_prompts": 1, "max_new_tokens": 4, "reward_prompts": 8,
                                "samples_per_query": 4}}}}}, sort_keys=False)


def _flow_run_id(workdir: Path) -> str | None:
    for path in (workdir / "runs" / "tiny").glob("*/summary.json"):
        try:
            return json.loads(path.read_text()).get("prefect_flow_run_id")
        except ValueError:
            return None
    return None


def _logs(client, flow_run_id: str) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    return [entry.message for entry in client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=0)]


def _live_ppo_metrics(workdir: Path) -> int:
    """Points of the PPO child run's reward curve while that run still says `running`."""
    from mlflow.tracking import MlflowClient
    db = workdir / "mlflow.db"
    if not db.exists():
        return 0
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.stage = 'ppo' and tags.status = 'running'")
    return max((len(client.get_metric_history(r.info.run_id, "curve/reward_mean")) for r in runs), default=0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_running_pipeline_shows_its_steps_everywhere(tmp_path, tiny_model):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType,
                                                FlowRunFilter, TaskRunFilter)
    from prefect.client.schemas.sorting import ArtifactSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from shomin.flows.server import start_prefect
    (tmp_path / "pipelines.yaml").write_text(pipeline(tiny_model))
    server = start_prefect(tmp_path, port=None, timeout=120)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {
        "PYTHONPATH": str(ROOT), "PREFECT_API_URL": f"{server.url}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cli = [sys.executable, "-m", "shomin.flows.cli"]
    try:
        run = subprocess.Popen([*cli, "run", "tiny"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        while _flow_run_id(tmp_path) is None and run.poll() is None:
            time.sleep(0.2)
        watcher = subprocess.Popen([*cli, "runs", "--watch"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        flow_run_id, during, live_points = _flow_run_id(tmp_path), [], 0
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            while run.poll() is None:
                if not client.read_flow_run(flow_run_id).state.is_final():
                    during += [m for m in _logs(client, flow_run_id) if " step " in m and m not in during]
                live_points = max(live_points, _live_ppo_metrics(tmp_path))
                time.sleep(0.5)
            output = run.stdout.read()
            assert run.returncode == 0, output[-3000:]
            after = _logs(client, flow_run_id)
            progress = client.read_artifacts(
                artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"]),
                                               flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])),
                flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(), sort=ArtifactSort.CREATED_DESC,
                limit=50, offset=0)
        watched = watcher.communicate(timeout=60)[0]
    finally:
        server_url = server.url
        if "watcher" in locals() and watcher.poll() is None:
            watcher.kill()

    try:
        # while it ran: stage log lines with step and metrics, and PPO's curve in MLflow before PPO finished
        assert any(m.startswith(("sft step", "ppo step")) for m in during), during
        assert live_points >= 1
        # after: the whole story in the flow run's log
        assert any(m.startswith("sft: training to step 24 [model ") and "planned peak" in m for m in after), after
        assert any(m.startswith("sft step 24/24 (100%) loss ") and " lr " in m and "left" in m for m in after)
        ppo_last = next(m for m in after if m.startswith(f"ppo step {PPO_STEPS}/{PPO_STEPS} (100%)"))
        assert all(f" {k} " in ppo_last for k in ("reward", "kl", "kl_coef", "lr"))
        assert any(m.startswith("ppo done in") and "reward" in m for m in after)
        assert any(m.startswith("evaluate done in") for m in after)
        # progress artifacts: one per long stage, each ended at 100%
        assert {a.description.split(":")[0] for a in progress} >= {"sft", "ppo", "evaluate"}
        assert all(a.data == 100.0 for a in progress)
        # MLflow's parent run links back to the flow run's page
        from mlflow.tracking import MlflowClient
        mlflow = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        (parent,) = mlflow.search_runs([mlflow.get_experiment_by_name("tiny").experiment_id],
                                       "tags.`mlflow.runName` LIKE 'tiny/%'")
        assert parent.data.tags["prefect.flow_run_url"].endswith(flow_run_id)
        # the terminal follower saw steps and the end
        assert " step " in watched and watched.rstrip().endswith("completed"), watched
        _logs_tab_screenshot(server_url, flow_run_id)
    finally:
        server.stop()


def _logs_tab_screenshot(url: str, flow_run_id: str) -> None:
    chromium = find_chromium()
    if chromium is None:
        return   # the API checks above stand; the picture needs Debian's chromium (.ci/run installs it)
    with Browser(chromium) as b:
        b.navigate(f"{url}/runs/flow-run/{flow_run_id}")
        b.wait_for_text(["Logs"], timeout=60)
        b.click_text("Logs")
        text = b.wait_for_text(["ppo step", "reward", "kl_coef"], timeout=60)
        assert "sft step" in text or "ppo done" in text
        shot = b.screenshot(output_dir() / "prefect-flow-run-logs.png")
    assert shot.stat().st_size > 20_000
