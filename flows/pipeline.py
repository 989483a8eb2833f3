"""One pipeline run = one Prefect flow run; one stage = one named task run.

The flow only composes: it hands each stage its settings and the previous
stages' results (paths and small records), folds the results into
summary.json and mirrors them to MLflow. No ML happens here.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

from prefect import flow
from prefect.runtime import flow_run

from flows import stages as st
from tasks.config import Pipeline, load_pipeline
from tasks.model import resolve_device
from tasks.rundir import RunDir, StageResult, new_run_id
from tasks.tracking import Tracker, git_commit

CHECKPOINTED = {"sft", "ppo"}


def _flow_run_name() -> str:
    params = flow_run.parameters
    return f"{params['pipeline']}:{params.get('run_id') or new_run_id()}"


class StageFailed(RuntimeError):
    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"stage '{stage}' failed: {error}")
        self.stage, self.error = stage, error


class StageRunner:
    """Runs one stage task, tells a cache hit from a fresh run, records both."""

    def __init__(self, pipeline: Pipeline, run: RunDir, tracker: Tracker, refresh: bool):
        self.p, self.run, self.tracker, self.refresh = pipeline, run, tracker, refresh
        self.tags = {"pipeline": pipeline.name, "run_id": run.run_id, "seed": str(pipeline.seed),
                     "git_commit": git_commit(Path(__file__).parent) or "unknown"}

    def __call__(self, stage: str, task_fn, settings: Any, **params: Any) -> StageResult:
        params = {"settings": settings, **params, "out_dir": str(self.run.stage_dir(stage))}
        if stage in CHECKPOINTED:  # keyed by inputs, outside the run folder: a rerun resumes
            key = st.stage_key(stage, params)
            params["checkpoint_dir"] = str(self.run.path.parent / ".checkpoints" / key)
        t0 = time.time()
        fn = task_fn.with_options(refresh_cache=True) if self.refresh else task_fn
        state = fn(**params, return_state=True)
        if state.is_completed():
            result = state.result()
            cached = state.name == "Cached"
            if cached and not Path(result.output_dir).exists():  # the earlier run's folder is gone
                state = task_fn.with_options(refresh_cache=True)(**params, return_state=True)
                result, cached = state.result(raise_on_failure=False), False
        if not state.is_completed():
            error = state.result(raise_on_failure=False)
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            self.run.record_stage(stage, "failed", error=message, seconds=time.time() - t0)
            self.tracker.log_stage(stage, "failed", _settings_dict(settings), None, self.tags, error=message)
            raise StageFailed(stage, error) from error if isinstance(error, BaseException) else None
        status = "cached" if cached else "completed"
        if cached:
            self.run.link_stage(stage, result.output_dir)
        self.run.record_stage(stage, status, result)
        self.tracker.log_stage(stage, status, _settings_dict(settings), result, self.tags)
        return result


def _settings_dict(settings: Any) -> dict:
    return settings.model_dump(mode="json") if hasattr(settings, "model_dump") else {}


def run_stages(p: Pipeline, run: StageRunner, device: str) -> dict[str, StageResult]:
    """The chain, in order; each stage gets only what it needs."""
    s, out = p.stages, {}
    if s.env_check:
        out["env_check"] = run("env_check", st.env_check_task, s.env_check, pipeline=p)
    if s.model_init:
        out["model_init"] = run("model_init", st.model_init_task, s.model_init, spec=p.model)
    if s.dataset:
        out["dataset"] = run("dataset", st.dataset_task, s.dataset, spec=p.dataset, seed=p.seed)
    if s.sft:
        out["sft"] = run("sft", st.sft_task, s.sft, spec=p.model, model_res=out["model_init"],
                         data_res=out["dataset"], device=device, seed=p.seed)
    if s.merge:
        out["merge"] = run("merge", st.merge_task, s.merge, spec=p.model, model_res=out["model_init"],
                           sft_res=out["sft"])
    if s.ppo:
        out["ppo"] = run("ppo", st.ppo_task, s.ppo, spec=p.model, merge_res=out["merge"],
                         data_res=out["dataset"], device=device, seed=p.seed)
    if s.evaluate:
        out["evaluate"] = run(
            "evaluate", st.evaluate_task, s.evaluate, spec=p.model, model_res=out["model_init"],
            data_res=out["dataset"], adapter_path=getattr(out.get("sft"), "adapter_path", None),
            merged_path=getattr(out.get("merge"), "merged_path", None),
            ppo_adapter_path=getattr(out.get("ppo"), "adapter_path", None),
            ppo_settings=s.ppo, device=device, seed=p.seed)
    return out


def _publish(summary: dict, results: dict, tracker: Tracker, p: Pipeline) -> None:
    """Prefect artifacts, MLflow plots/tables (flows/artifacts.py); never fails a run."""
    try:
        from flows.artifacts import publish_artifacts
        publish_artifacts(summary, results, tracker, p)
    except Exception as e:  # noqa: BLE001 - a picture must never cost a finished run
        print(f"shomin: warning: could not publish artifacts ({type(e).__name__}: {e})", file=sys.stderr)


@flow(name="shomin", flow_run_name=_flow_run_name, validate_parameters=False)
def pipeline_flow(pipeline: str, config: str = "pipelines.yaml", overrides: list[str] | None = None,
                  run_id: str | None = None, refresh: bool = False, workdir: str = ".") -> dict:
    """Run one pipeline of a pipelines.yaml; returns its summary (also in summary.json)."""
    p = load_pipeline(config, pipeline, overrides or [])
    run_id = run_id or (flow_run.name or "").partition(":")[2] or None
    rundir = RunDir(Path(workdir) / p.output_dir, p.name, run_id)
    rundir.summary["prefect_flow_run_id"] = str(flow_run.id) if flow_run.id else None
    tracker = Tracker(p.tracking, p.tracking.experiment or p.name, workdir)
    runner = StageRunner(p, rundir, tracker, refresh)
    rundir.summary["mlflow_run_id"] = tracker.start(
        f"{p.name}/{rundir.run_id}", p.model_dump(mode="json", exclude={"stages"}), runner.tags)
    rundir.save()
    try:
        results = run_stages(p, runner, resolve_device(p.device))
    except BaseException as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        rundir.finish("failed", message)
        _publish(rundir.summary, {}, tracker, p)  # stage artifacts are in the summary
        tracker.finish("failed")
        raise
    rundir.finish("completed")
    _publish(rundir.summary, results, tracker, p)
    tracker.finish("completed", (results.get("evaluate") or StageResult(stage="", output_dir="")).metrics)
    return rundir.summary


def run_pipeline(pipeline: str, config: str = "pipelines.yaml", overrides: list[str] | None = None,
                 refresh: bool = False, on_start: Callable[[str], None] | None = None) -> dict:
    """Entry for the CLI and tests: one flow run, ephemeral Prefect unless PREFECT_API_URL is set."""
    run_id = new_run_id()
    if on_start:
        on_start(run_id)
    return pipeline_flow(pipeline=pipeline, config=config, overrides=overrides or [], run_id=run_id,
                         refresh=refresh)
