"""MLflow records: one parent run per pipeline run, one child run per stage.

Everything goes through MlflowClient with explicit run ids rather than
`mlflow.start_run()`: the active-run stack is thread-local and Prefect runs
tasks in worker threads, so an implicit active run would not reach them.
Params are flattened settings; anything that looks like a secret is redacted
and long values are cut to MLflow's limit instead of failing the run.
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.ground.records import StageResult
from shomin.tasks.ground.settings import Tracking

MAX_PARAM = 6000        # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_KEY = 250
ARTIFACT_BYTES = 200 * 2**20  # per stage; larger files (merged weights) are referenced by path tag
SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential|auth)", re.I)
SECRET_VALUE = re.compile(r"^(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16})$")


def tracking_uri(tracking: Tracking, workdir: str | Path = ".") -> str:
    return tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).resolve()}/mlflow.db"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server must answer before a run starts: one ConfigError line if it does not."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return   # it answered (some servers have no /health): reachable
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ConfigError(f"tracking.uri: MLflow at {redact('uri', uri)} does not answer ({reason}); start it "
                          "(`shomin server`), or unset tracking.uri and MLFLOW_TRACKING_URI to use sqlite:///mlflow.db") from None


def redact(key: str, value: Any) -> str:
    text = str(value)
    if SECRET_KEY.search(key) or SECRET_VALUE.match(text.strip()):
        return "***"
    # environment-style secrets pasted into a value
    for env_value in env_secrets():
        if env_value in text:
            text = text.replace(env_value, "***")
    return text[:MAX_PARAM]


def env_secrets() -> list[str]:
    """Values of secret-looking environment variables. Another thread (MLflow's telemetry) may
    add or drop a variable while os.environ is walked, which raises KeyError mid-walk (seen
    in bench/faults.py): walk again rather than fail the run, or redact nothing."""
    for attempt in range(5):
        try:
            return [v for k, v in os.environ.items() if SECRET_KEY.search(k) and len(v) >= 8]
        except (KeyError, RuntimeError):
            if attempt == 4:
                raise
    return []


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip(".")[:MAX_KEY]: obj}


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def server_gone(uri: str) -> bool:
    """A server (MLflow, or Prefect's API) that no longer answers at `uri`/health; a sqlite store
    is never 'gone'."""
    try:
        check_reachable(uri, timeout=3.0)
    except ConfigError:
        return True
    return False


def best_effort(default: Any = None):
    """For Tracker calls made while a run is under way: when the tracking server has stopped
    answering, say so once and go on without it (summary.json keeps the run's records), so a
    server that dies mid-run never costs the training. Other errors are real and raised."""
    def wrap(method):
        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            if self.lost:
                return default
            try:
                return method(self, *args, **kwargs)
            except Exception as e:
                if not server_gone(self.uri):
                    raise
                if not self.lost:
                    self.lost = (f"MLflow at {redact('uri', self.uri)} stopped answering "
                                 f"({type(e).__name__}); the run went on without it")
                    print(f"shomin: warning: {self.lost}; its figures are in summary.json", file=sys.stderr)
                return default
        return guarded
    return wrap


class Tracker:
    """A pipeline run's MLflow parent and its stage children. Once the run has started, a
    tracking server that dies is noted (`lost`) and the run goes on without it."""

    def __init__(self, tracking: Tracking, experiment: str, workdir: str | Path = "."):
        import mlflow
        from mlflow.tracking import MlflowClient
        self.uri = tracking_uri(tracking, workdir)
        if self.uri.startswith(("http://", "https://")):
            # MLflow's default is 7 retries with growing back-off (minutes per call) when its server
            # is away; a few seconds tell a restart from a server that is gone
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.lost: str | None = None   # why the run went on without its tracking server
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:"):  # artifacts in a folder beside the database
                db = Path(self.uri.removeprefix("sqlite:///"))
                location = (db.parent / "mlartifacts" / experiment).resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        self.parent_id: str | None = None
        self.stage_runs: dict[str, str] = {}   # stage -> the child run this tracker created for it
        self.live_keys: dict[str, set[str]] = {}   # child run -> metric keys logged while it ran

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.parent_id = run.info.run_id
        self._log_params(self.parent_id, params)
        return self.parent_id

    @best_effort()
    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        items = [Param(k, redact(k, v)) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i: i + 100])

    @best_effort("")
    def begin_stage(self, stage: str, settings: dict[str, Any], tags: dict[str, str]) -> str:
        """The stage's child run, opened as the stage starts so curves can arrive while it runs."""
        run = self.client.create_run(self.experiment_id, run_name=stage,
                                     tags={**tags, "mlflow.parentRunId": self.parent_id, "stage": stage,
                                           "status": "running"})
        self.stage_runs[stage] = run.info.run_id
        self._log_params(run.info.run_id, settings)
        return run.info.run_id

    @best_effort()
    def log_live(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """One step of a running stage, as the `curve/` metrics its log file would give at the end."""
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        batch = [Metric(f"curve/{k}", v, now, step) for k, v in metrics.items() if v == v]
        self.live_keys.setdefault(run_id, set()).update(m.key for m in batch)
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    @best_effort()
    def system_monitor(self, run_id: str, every_s: float = 5.0):
        """MLflow's own sampler of CPU, memory, disk (and GPU with pynvml) for a running stage; the
        caller calls `.finish()` on it when the stage ends."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, tracking_uri=self.uri)
        monitor.start()
        return monitor

    @best_effort("")
    def log_stage(self, stage: str, status: str, settings: dict[str, Any], result: StageResult | None,
                  tags: dict[str, str], error: str | None = None) -> str:
        from mlflow.entities import Metric
        rid = self.stage_runs.get(stage) or self.begin_stage(stage, settings, tags)
        self.client.set_tag(rid, "status", status)
        now = int(time.time() * 1000)
        if result is not None:
            metrics = [Metric(k, float(v), now, 0) for k, v in result.metrics.items()]
            live = self.live_keys.get(rid, set())   # curves already logged step by step stay as they are
            metrics += [m for m in curve_metrics(result) if m.key not in live]
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(rid, metrics=metrics[i: i + 1000])
            self.client.log_metric(rid, "seconds", result.seconds)
            self._log_artifacts(rid, Path(result.output_dir))
            for k, v in result.artifacts.items():
                self.client.set_tag(rid, f"artifact.{k}", v[:MAX_PARAM])
        if error:
            self.client.set_tag(rid, "error", redact("error", error))
        self.client.set_terminated(rid, "FINISHED" if status in ("completed", "cached") else "FAILED")
        return rid

    @best_effort()
    def _log_artifacts(self, run_id: str, folder: Path) -> None:
        budget = ARTIFACT_BYTES
        for f in sorted(folder.rglob("*")):
            if not f.is_file() or f.stat().st_size > budget or f.suffix == ".pt":
                continue
            budget -= f.stat().st_size
            sub = f.parent.relative_to(folder).as_posix()
            self.client.log_artifact(run_id, str(f), None if sub == "." else sub)

    @best_effort()
    def finish(self, status: str, metrics: dict[str, float] | None = None) -> None:
        from mlflow.entities import Metric
        if metrics:
            now = int(time.time() * 1000)
            self.client.log_batch(self.parent_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
        self.client.set_terminated(self.parent_id, "FINISHED" if status == "completed" else "FAILED")


    # ------------------------------------------------------------ after the stages (flows/artifacts.py)

    @best_effort()
    def tag(self, tags: dict[str, str], stages: bool = False) -> None:
        """Tags on the parent run (and every stage run, with `stages`); empty values are skipped."""
        for rid in [self.parent_id, *(self.stage_runs.values() if stages else [])]:
            for k, v in tags.items():
                if v:
                    self.client.set_tag(rid, k, v)

    @best_effort()
    def parent_tag(self, key: str) -> str | None:
        return self.client.get_run(self.parent_id).data.tags.get(key)

    @best_effort()
    def log_file(self, path: str | Path, folder: str, stage: str | None = None) -> None:
        """A file on the parent run, and on `stage`'s run when given."""
        for rid in filter(None, (self.stage_runs.get(stage) if stage else None, self.parent_id)):
            self.client.log_artifact(rid, str(path), folder)

    @best_effort()
    def log_table(self, data: dict[str, list], name: str, stage: str | None = None) -> None:
        for rid in filter(None, (self.stage_runs.get(stage) if stage else None, self.parent_id)):
            self.client.log_table(rid, data=data, artifact_file=name)

    @best_effort()
    def register(self, model_name: str, stage: str, path: str | Path, kind: str, run_id: str) -> dict | None:
        """`path` (a stage's output) as a new version of MLflow model `model_name`: from the stage
        run's artifacts when it logged them (small enough), else from the local path."""
        from mlflow.exceptions import MlflowException
        rid = self.stage_runs.get(stage)
        if rid is None:
            return None
        sub = Path(path).name
        logged = {a.path for a in self.client.list_artifacts(rid)}
        source = f"runs:/{rid}/{sub}" if sub in logged else Path(path).resolve().as_uri()
        try:
            self.client.get_registered_model(model_name)
        except MlflowException:
            self.client.create_registered_model(model_name, description=f"shomin pipeline {model_name}")
        mv = self.client.create_model_version(model_name, source, run_id=rid,
                                              tags={"kind": kind, "run_id": run_id, "stage": stage},
                                              description=f"{kind} of run {run_id}")
        self.client.set_tag(self.parent_id, "registered_model", f"{model_name}/{mv.version}")
        return {"name": model_name, "version": mv.version, "source": source, "kind": kind}


def recent_runs(tracking: Tracking, pipeline: str, workdir: str | Path, limit: int, metrics: tuple[str, ...]) -> list[dict]:
    """The newest parent runs of `pipeline` in its MLflow store (for `shomin runs`); an absent
    sqlite store is not created just to be listed."""
    uri = tracking_uri(tracking, workdir)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return []
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(tracking.experiment or pipeline)
    if exp is None:
        return []
    out = []
    for r in client.search_runs([exp.experiment_id], filter_string=f"tags.pipeline = '{pipeline}'",
                                order_by=["attributes.start_time DESC"], max_results=limit * 10):
        tags = r.data.tags
        if "mlflow.parentRunId" in tags or "run_id" not in tags:
            continue
        seconds = (r.info.end_time - r.info.start_time) / 1000 if r.info.end_time and r.info.start_time else None
        out.append({"pipeline": pipeline, "run_id": tags["run_id"], "mlflow_run_id": r.info.run_id,
                    "mlflow_status": r.info.status, "seconds": seconds, "start_ms": r.info.start_time,
                    "metrics": {k: r.data.metrics[k] for k in metrics if k in r.data.metrics}})
        if len(out) >= limit:
            break
    return out


def curve_metrics(result: StageResult) -> list:
    """Per-step curves from a stage's log file (TRL log_history or ppo_log) as step metrics."""
    from mlflow.entities import Metric
    path = result.artifacts.get("log_history") or result.artifacts.get("ppo_log")
    if not path or not Path(path).exists():
        return []
    out = []
    now = int(time.time() * 1000)
    for entry in json.loads(Path(path).read_text()):
        step = int(entry.get("step", 0))
        for k, v in entry.items():
            if k != "step" and isinstance(v, (int, float)) and v == v:
                out.append(Metric(f"curve/{k}", float(v), now, step))
    return out
