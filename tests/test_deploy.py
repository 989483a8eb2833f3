"""Scheduled reruns: prefect.yaml names real entrypoints; a schedule served against a real Prefect
server on loopback fires within a minute and completes every stage; CLI comfort (schema, runs)."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from shomin.flows.server import stop_process_group

from tests.conftest import ROOT, tiny_chain

STAGES = ["env_check", "model_init", "dataset", "sft", "merge", "evaluate"]
SFT = "max_steps: 2, batch_size: 4, micro_batch_size: 4, max_seq_length: 48, learning_rate: 0.01, save_steps: 2, logging_steps: 1"
EVALUATE = "max_rows: 4, num_prompts: 1, max_new_tokens: 4, max_seq_length: 160"
EXTRA = """
description: "tiny scheduled chain"
schedule:
  cron: "* * * * *"
  timezone: UTC
  overrides: {stages.evaluate.num_prompts: 2}
"""


def cli_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    return env | {"PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"} | extra


def shomin(*args, cwd, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "shomin.flows.cli", *args], cwd=cwd, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- fast: files a user edits or deploys


def test_prefect_yaml_names_real_entrypoints():
    from prefect.flows import load_flow_from_entrypoint
    from shomin.flows.deploy import prefect_yaml_deployments
    from shomin.tasks.registry import load_config
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert spec["name"] == "shomin" and spec["deployments"]
    config = load_config(ROOT / "pipelines.yaml")
    pools = {p["name"] for p in spec["definitions"]["work_pools"].values()}
    for dep in spec["deployments"]:
        path, _, func = dep["entrypoint"].partition(":")
        assert (ROOT / path).is_file(), dep["entrypoint"]
        flow = load_flow_from_entrypoint(f"{ROOT / path}:{func}")
        assert flow.name == "shomin"
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(dep["parameters"]) <= accepted, dep["parameters"]
        assert dep["parameters"]["pipeline"] in config
        assert dep["work_pool"]["name"] in pools
        for sched in dep["schedules"]:
            from prefect.schedules import Cron
            Cron(sched["cron"], timezone=sched["timezone"])  # parses
    for step in spec["pull"] + spec["definitions"]["pull"]["git"]:
        (fq,) = step
        module, _, fn = fq.rpartition(".")
        assert callable(getattr(__import__(module, fromlist=[fn]), fn)), fq
    # the same deployments as the schedules in pipelines.yaml
    want = {d["name"]: d for d in prefect_yaml_deployments(ROOT / "pipelines.yaml")}
    have = {d["name"]: {k: d[k] for k in ("name", "entrypoint", "parameters", "schedules")} for d in spec["deployments"]}
    assert have == want
    ignored = (ROOT / ".prefectignore").read_text().split()
    for must in (".venv/", "runs/", "mlartifacts/", "mlflow.db", ".prefect/"):
        assert must in ignored


def test_schema_is_shipped_and_referenced(tmp_path):
    r = shomin("schema", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    assert schema == json.loads((ROOT / "pipelines.schema.json").read_text()), \
        "pipelines.schema.json is stale: run `shomin schema > pipelines.schema.json`"
    first = (ROOT / "pipelines.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=./pipelines.schema.json"
    pipeline = schema["$defs"]["Pipeline"]
    assert pipeline["additionalProperties"] is False and "schedule" in pipeline["properties"]
    assert "register" in schema["$defs"]["Tracking"]["properties"]
    # the shipped file validates against it (jsonschema ships with mlflow)
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(yaml.safe_load((ROOT / "pipelines.yaml").read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"pipelines": {"x": {"model": {"source": "a"}, "stages": {}, "typo": 1}}}, schema)


def test_serve_refuses_without_server_or_schedule(tmp_path, tiny_model):
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(tiny_chain(tiny_model, sft=SFT, evaluate=EVALUATE, extra=EXTRA))
    r = shomin("serve", "tiny", cwd=tmp_path)
    assert r.returncode == 2 and "needs a Prefect server" in r.stderr
    r = shomin("serve", "nope", cwd=tmp_path, env=cli_env(PREFECT_API_URL="http://127.0.0.1:9/api"))
    assert r.returncode == 2 and "no pipeline named 'nope'" in r.stderr
    from shomin.flows.deploy import build_deployments, override_list
    assert override_list({"stages.sft.max_steps": 3, "model.source": "a/b", "x": True, "y": [1, 2]}) == [
        "stages.sft.max_steps=3", "model.source=a/b", "x=true", "y=[1, 2]"]
    (dep,) = build_deployments(cfg, ["tiny"], tmp_path)
    assert dep.name == "tiny" and dep.entrypoint == "shomin.flows.pipeline.pipeline_flow"
    assert dep.parameters["overrides"] == ["stages.evaluate.num_prompts=2"]
    assert dep.parameters["config"] == str(cfg.resolve())


def test_runs_lists_summaries_and_mlflow(tmp_path):
    run = tmp_path / "runs" / "demo" / "20260101-000000-abcdef"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "pipeline": "demo", "run_id": run.name, "status": "completed", "started_at": "2026-01-01T00:00:00+00:00",
        "seconds": 12.5, "stages": {"sft": {"status": "completed", "seconds": 10.0, "metrics": {}},
                                    "evaluate": {"status": "cached", "seconds": 0.1,
                                                 "metrics": {"loss_before": 3.0, "loss_after": 2.5}}}}))
    r = shomin("runs", "--no-mlflow", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert run.name in r.stdout and "sft:10.0s" in r.stdout and "loss=2.5" in r.stdout and "(c)" in r.stdout
    r = shomin("runs", "demo", "--json", cwd=tmp_path, env=cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/none.db"))
    (row,) = json.loads(r.stdout)
    assert row["status"] == "completed" and row["metrics"] == {"loss_before": 3.0, "loss_after": 2.5}
    assert not (tmp_path / "none.db").exists()  # listing never creates a store


# ---------------------------------------------------------------- slow: a real schedule on a real server


@pytest.mark.slow
@pytest.mark.timeout(330)
def _wait_for_run(http, deployment: str, state: str, deadline: float, serve_proc, tmp_path) -> dict:
    """The first flow run of `deployment` that ended in `state`; no run may end otherwise meanwhile."""
    while time.monotonic() < deadline:
        runs = http.post("/flow_runs/filter", json={
            "flow_runs": {"deployment_id": {"any_": [deployment]},
                          "state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}},
            "sort": "EXPECTED_START_TIME_ASC", "limit": 20}).json()
        other = [fr for fr in runs if fr["state_type"] not in (state, "FAILED" if state == "COMPLETED" else state)]
        assert not other, (other[0]["state"], (tmp_path / "serve.log").read_text()[-4000:])
        found = next((fr for fr in runs if fr["state_type"] == state), None)
        if found is not None:
            return found
        assert serve_proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        time.sleep(2)
    raise AssertionError(f"no scheduled run ended {state}:\n" + (tmp_path / "serve.log").read_text()[-3000:])


def test_schedule_fires_and_completes_on_a_real_server(tmp_path, tiny_model):
    """A scheduled run that fails leaves `serve` running and the schedule firing: the next one completes."""
    from shomin.flows.server import free_port
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(tiny_chain(tiny_model, sft=SFT, evaluate=EVALUATE, extra=EXTRA))
    env = cli_env(PREFECT_HOME=str(tmp_path / ".prefect"),
                  PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS="5",  # the server schedules runs promptly
                  PREFECT_API_SERVICES_SCHEDULER_MIN_RUNS="1", PREFECT_API_SERVICES_SCHEDULER_MAX_RUNS="3",
                  PREFECT_RUNNER_POLL_FREQUENCY="2", HF_HUB_OFFLINE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    port, mlflow_port = free_port(), free_port()
    serve_proc = None
    t0 = time.monotonic()
    try:
        r = shomin("server", "--detach", "--prefect-port", str(port), "--mlflow-port", str(mlflow_port),
                   cwd=tmp_path, env=env, timeout=150)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"http://127.0.0.1:{port}" in r.stdout
        api = f"http://127.0.0.1:{port}/api"
        t_server = time.monotonic() - t0
        # `serve` finds the detached server through .prefect/shomin-servers.json
        (tmp_path / "runs").write_text("not a folder")   # the first scheduled run fails on it
        serve_proc = subprocess.Popen([sys.executable, "-m", "shomin.flows.cli", "serve", "tiny"], cwd=tmp_path, env=env,
                                      stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        with httpx.Client(base_url=api, timeout=10) as http:
            deadline = time.monotonic() + 240
            dep = None
            while dep is None and time.monotonic() < deadline:
                resp = http.get("/deployments/name/shomin/tiny")
                dep = resp.json() if resp.status_code == 200 else None
                assert serve_proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
            assert dep is not None, "deployment never registered"
            assert dep["schedules"][0]["schedule"]["cron"] == "* * * * *"
            assert dep["parameters"]["overrides"] == ["stages.evaluate.num_prompts=2"]
            # the first scheduled run fails (its output folder is blocked by a file); `serve` must
            # outlive it and the schedule fire again
            failed = _wait_for_run(http, dep["id"], "FAILED", deadline, serve_proc, tmp_path)
            assert serve_proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            (tmp_path / "runs").unlink()
            done = _wait_for_run(http, dep["id"], "COMPLETED", deadline + 120, serve_proc, tmp_path)
            assert done["expected_start_time"] > failed["expected_start_time"]
            assert done["auto_scheduled"] and done["name"].startswith("tiny:")
            tasks = http.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [done["id"]]}}, "limit": 50}).json()
            assert sorted(t["name"].rsplit("-", 1)[0] for t in tasks) == sorted(STAGES)
            assert all(t["state_type"] == "COMPLETED" for t in tasks)
            arts = http.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [done["id"]]}}}).json()
            assert {"tiny-evaluation", "tiny-stages", "tiny-generations", "tiny-mlflow"} <= {a["key"] for a in arts}
            link = next(a for a in arts if a["key"] == "tiny-mlflow")
            assert f"http://127.0.0.1:{mlflow_port}/#/experiments/" in link["data"]  # the MLflow server beside it
        run_id = done["name"].partition(":")[2]
        summary = json.loads((tmp_path / "runs" / "tiny" / run_id / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["prefect_flow_run_id"] == done["id"]
        report = json.loads(Path(summary["stages"]["evaluate"]["artifacts"]["eval_json"]).read_text())
        assert len(report["samples"]) == 2  # the schedule's override reached the run
        # the MLflow server started beside it serves the same store
        with httpx.Client(timeout=10) as http:
            got = http.get(f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/runs/get",
                           params={"run_id": summary["mlflow_run_id"]})
            assert got.status_code == 200 and got.json()["run"]["info"]["status"] == "FINISHED"
        print(f"server up in {t_server:.1f}s, scheduled run completed {time.monotonic() - t0:.1f}s after start")
    finally:
        if serve_proc is not None:
            stop_process_group(serve_proc.pid, grace=5)
            serve_proc.wait(timeout=10)
        r = shomin("server", "--stop", cwd=tmp_path, env=env, timeout=60)
        state = tmp_path / ".prefect" / "shomin-servers.json"
        if state.exists():  # --stop failed: kill what it recorded
            for entry in json.loads(state.read_text()):
                stop_process_group(entry["pid"], grace=5)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)
