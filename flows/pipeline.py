"""One pipeline run = one Prefect flow run; one stage = one named task run.

The flow only composes: it hands each stage its settings and the previous
stages' results (paths and small records), folds the results into
summary.json and mirrors them to MLflow. No ML happens here.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

from prefect import flow
from prefect.runtime import flow_run
from shomin.flows.prefect_tasks import stage_task
from shomin.flows.watch import StageWatcher
from shomin.tasks import registry
from shomin.tasks.ground.cards import write_run_cards
from shomin.tasks.ground.contract import Stage
from shomin.tasks.ground.progress import watched_by
from shomin.tasks.ground.records import StageResult
from shomin.tasks.ground.rundir import RunDir, intact, new_run_id, settle_all, write_json
from shomin.tasks.ground.settings import PipelineBase
from shomin.tasks.ground.tracking import Tracker, git_commit
from shomin.tasks.models.environment import cap_device_memory
from shomin.tasks.models.loading import resolve_device


def _flow_run_name() -> str:
    params = flow_run.parameters
    return f"{params['pipeline']}:{params.get('run_id') or new_run_id()}"


class StageFailed(RuntimeError):
    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"stage '{stage}' failed: {error}")
        self.stage, self.error = stage, error


class StageRunner:
    """Runs one stage task, tells a cache hit from a fresh run, records both."""

    def __init__(self, pipeline: PipelineBase, run: RunDir, tracker: Tracker, refresh: bool, device: str):
        self.p, self.run, self.tracker, self.refresh, self.device = pipeline, run, tracker, refresh, device
        self.plan: dict | None = None
        self.tags = {"pipeline": pipeline.name, "run_id": run.run_id, "seed": str(pipeline.seed),
                     "git_commit": git_commit(Path(__file__).parent) or "unknown"}

    def __call__(self, stage: Stage, results: dict[str, StageResult]) -> StageResult:
        inputs = stage.inputs_of(results)
        if stage.checks_plan:   # the plan that stage checks, and every later stage's OOM advice reads
            self.plan = registry.plan_context(self.p)
        ctx = registry.context(stage, self.p, self.device, self.run.stage_dir(stage.name), plan=self.plan)
        if stage.checkpoints:  # keyed by inputs, outside the run folder: a rerun resumes
            key = registry.stage_key(stage, ctx, inputs)
            ctx = ctx.model_copy(update={"checkpoint_dir": str(self.run.path.parent / ".checkpoints" / key)})
        self.run.record_stage(stage.name, "running")   # what a kill leaves behind says where it happened
        t0, task_fn = time.time(), stage_task(stage)
        fn = task_fn.with_options(refresh_cache=True) if self.refresh else task_fn
        settings = ctx.settings.model_dump(mode="json")
        watcher = StageWatcher(stage.name, self.run.path, self.tracker,
                               self.tracker.begin_stage(stage.name, settings, self.tags), intro=_intro(ctx))
        state = _watched(fn, ctx, inputs, watcher)
        if state.is_completed():
            result = state.result()
            cached = state.name == "Cached"
            if cached and not intact(result.output_dir):  # the earlier run's folder is gone, or lost files
                state = _watched(task_fn.with_options(refresh_cache=True), ctx, inputs, watcher)
                result, cached = state.result(raise_on_failure=False), False
        if not state.is_completed():
            error = state.result(raise_on_failure=False)
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            self.run.record_stage(stage.name, "failed", error=message, seconds=time.time() - t0)
            self.tracker.log_stage(stage.name, "failed", settings, None, self.tags, error=message)
            raise StageFailed(stage.name, error) from error if isinstance(error, BaseException) else None
        status = "cached" if cached else "completed"
        if cached:
            self.run.link_stage(stage.name, result.output_dir)
        self.run.record_stage(stage.name, status, result)
        self.tracker.log_stage(stage.name, status, settings, result, self.tags)
        return result


def _watched(task_fn, ctx, inputs, watcher: StageWatcher):
    """The stage task run with its progress reports going to `watcher`."""
    with watched_by(watcher):
        try:
            return task_fn(ctx, inputs, return_state=True)
        finally:
            watcher.close()


def _intro(ctx) -> str:
    """What the stage's first log line says about where it runs."""
    peak = ctx.planned_peak_gib()
    return (f"[model {ctx.model.source}, {ctx.model.quantization}, on {ctx.device}"
            + (f", planned peak {peak:.2f} GiB" if peak is not None else "") + "]")


def run_stages(p: PipelineBase, run: StageRunner) -> dict[str, StageResult]:
    """The chain: every present stage in registry order, each with the earlier results it declares."""
    results: dict[str, StageResult] = {}
    for stage in registry.present(p):
        results[stage.name] = run(stage, results)
    return results


def _publish(summary: dict, results: dict, tracker: Tracker, p: PipelineBase) -> None:
    """Prefect artifacts, MLflow plots/tables (flows/artifacts.py); never fails a run."""
    try:
        from shomin.flows.artifacts import publish_artifacts
        publish_artifacts(summary, results, tracker, p)
    except Exception as e:  # noqa: BLE001 - a picture must never cost a finished run
        print(f"shomin: warning: could not publish artifacts ({type(e).__name__}: {e})", file=sys.stderr)


def _note_lost_tracking(rundir: RunDir, tracker: Tracker) -> None:
    """A tracking server that died mid-run: the summary says so (its figures are all there)."""
    if tracker.lost:
        rundir.summary["tracking_lost"] = tracker.lost


@flow(name="shomin", flow_run_name=_flow_run_name, validate_parameters=False)
def pipeline_flow(pipeline: str, config: str = "pipelines.yaml", overrides: list[str] | None = None,
                  run_id: str | None = None, refresh: bool = False, workdir: str = ".") -> dict:
    """Run one pipeline of a pipelines.yaml; returns its summary (also in summary.json)."""
    p = registry.load_pipeline(config, pipeline, overrides or [])
    settle_all(Path(workdir) / p.output_dir, p.name)   # earlier runs of it that were killed: say so
    run_id = run_id or (flow_run.name or "").partition(":")[2] or None
    rundir = RunDir(Path(workdir) / p.output_dir, p.name, run_id)
    rundir.summary["prefect_flow_run_id"] = str(flow_run.id) if flow_run.id else None
    rundir.summary["command"] = " ".join(["shomin run", *(["-f", config] if config != "pipelines.yaml" else []),
                                          pipeline, *(f"--set {o}" for o in overrides or [])])
    # the resolved pipeline, so a run's result can be prompted, described and exported as it was made
    write_json(rundir.path / "pipeline.json", p.model_dump(mode="json", by_alias=True))
    tracker = Tracker(p.tracking, p.tracking.experiment or p.name, workdir)
    runner = StageRunner(p, rundir, tracker, refresh, resolve_device(p.device))
    cap_device_memory(p.device_memory_gib, runner.device)   # torch held to what the plan checked against
    rundir.summary["mlflow_run_id"] = tracker.start(
        f"{p.name}/{rundir.run_id}", p.model_dump(mode="json", exclude={"stages"}), runner.tags)
    rundir.save()
    if flow_run.ui_url:   # from MLflow back to the flow run's page (the other way is a Prefect artifact)
        tracker.tag({"prefect.flow_run_url": flow_run.ui_url})
    try:
        results = run_stages(p, runner)
    except BaseException as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        _note_lost_tracking(rundir, tracker)
        rundir.finish("failed", message)
        _publish(rundir.summary, {}, tracker, p)  # stage artifacts are in the summary
        tracker.finish("failed")
        raise
    _note_lost_tracking(rundir, tracker)
    rundir.finish("completed")
    try:
        write_run_cards(rundir.path)
    except Exception as e:  # noqa: BLE001 - the weights are written; a card must not fail the run
        print(f"shomin: warning: model cards not written ({type(e).__name__}: {e})", file=sys.stderr)
    _publish(rundir.summary, results, tracker, p)
    last = list(results.values())[-1] if results else None
    tracker.finish("completed", last.metrics if last else None)
    return rundir.summary


def run_pipeline(pipeline: str, config: str = "pipelines.yaml", overrides: list[str] | None = None,
                 refresh: bool = False, on_start: Callable[[str], None] | None = None) -> dict:
    """Entry for the CLI and tests: one flow run, ephemeral Prefect unless PREFECT_API_URL is set."""
    run_id = new_run_id()
    if on_start:
        on_start(run_id)
    return pipeline_flow(pipeline=pipeline, config=config, overrides=overrides or [], run_id=run_id,
                         refresh=refresh)
