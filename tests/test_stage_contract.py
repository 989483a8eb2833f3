"""A new stage is one module and one registry line: a toy stage registered here runs
through the real flow, Prefect (task run, cache) and MLflow (child run), and the YAML,
the schema and the dependency check know it at once."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import Field
from shomin.tasks import registry
from shomin.tasks.ground.contract import Stage
from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.ground.records import StageResult
from shomin.tasks.ground.rundir import read_jsonl, staged_dir, write_json
from shomin.tasks.ground.settings import Strict

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


class CountSettings(Strict):
    factor: int = Field(1, gt=0, description="Multiply the row count by this.")


def count_rows(ctx, inputs) -> StageResult:
    """The toy stage: counts the training rows the dataset stage wrote."""
    n = len(read_jsonl(inputs["dataset"].train_path)) * ctx.settings.factor
    with staged_dir(ctx.out_dir) as tmp:
        write_json(tmp / "count.json", {"rows": n})
    return StageResult(stage="count", output_dir=ctx.out_dir, metrics={"rows": float(n)})


TOY = Stage("count", CountSettings, count_rows, needs=("dataset",), help="Count the training rows (a test stage).")


@pytest.fixture
def toy_stage():
    registry.register(TOY, after="dataset")     # the one line
    yield TOY
    registry.unregister("count")


def write(tmp_path: Path, stages: str) -> Path:
    data = ROOT / "data" / "dolly-ja-sample.jsonl"
    f = tmp_path / "pipelines.yaml"
    f.write_text(f"pipelines:\n  toy:\n    model: {{source: x/y}}\n    dataset: {{source: {data}, max_rows: 20}}\n"
                 f"    stages:\n{stages}", encoding="utf-8")
    return f


def test_a_registered_stage_runs_through_flow_prefect_and_mlflow(toy_stage, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from shomin.flows.pipeline import run_pipeline
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, "      dataset:\n      count: {factor: 3}\n")
    p = registry.load_pipeline(cfg, "toy")
    assert [s.name for s in registry.present(p)] == ["dataset", "count"] and p.stages.count.factor == 3
    assert "count" in registry.config_schema()["$defs"]["Stages"]["properties"]

    summary = run_pipeline("toy", str(cfg))
    entry = summary["stages"]["count"]
    n_train = summary["stages"]["dataset"]["metrics"]["n_train"]
    assert entry["status"] == "completed" and entry["metrics"]["rows"] == 3 * n_train
    out = Path(entry["output_dir"])
    assert json.loads((out / "count.json").read_text())["rows"] == 3 * n_train

    client = MlflowClient()
    child = [r for r in client.search_runs([client.get_run(summary["mlflow_run_id"]).info.experiment_id])
             if r.data.tags.get("stage") == "count"]
    assert len(child) == 1 and child[0].data.metrics["rows"] == 3 * n_train
    assert child[0].data.params["factor"] == "3"

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort
    with get_client(sync_client=True) as pc:
        runs = pc.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[summary["prefect_flow_run_id"]])),
                                 sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=50)
    names = {t.name.rsplit("-", 1)[0]: t.state.name for t in runs}
    assert names == {"dataset": "Completed", "count": "Completed"}, names

    again = run_pipeline("toy", str(cfg))              # same inputs: a cache hit, like any stage
    assert again["stages"]["count"]["status"] == "cached"

    (out / "count.json").write_text("{")               # damaged since (a full disk, a copy cut short)
    third = run_pipeline("toy", str(cfg))
    assert third["stages"]["count"]["status"] == "completed"   # detected and recomputed, not passed on
    assert json.loads((Path(third["stages"]["count"]["output_dir"]) / "count.json").read_text())["rows"] == 3 * n_train


def test_a_registered_stage_is_checked_like_the_others(toy_stage, tmp_path):
    with pytest.raises(ConfigError, match="stage 'count' needs stage 'dataset'"):
        registry.load_pipeline(write(tmp_path, "      count:\n"), "toy")
    with pytest.raises(ConfigError, match="count.factor"):
        registry.load_pipeline(write(tmp_path, "      dataset:\n      count: {factor: 0}\n"), "toy")
    with pytest.raises(ConfigError, match="order"):
        registry.load_pipeline(write(tmp_path, "      count:\n      dataset:\n"), "toy")


def test_unregistered_the_key_is_unknown_again(tmp_path):
    with pytest.raises(ConfigError, match="count: unknown key"):
        registry.load_pipeline(write(tmp_path, "      dataset:\n      count:\n"), "toy")
