"""What a person watching a run sees while a stage runs (tasks/ground/progress.py reports).

Each report of a stage becomes, while the stage runs:
- a log line through Prefect's run logger (the flow run's Logs tab, filterable per task
  run): what was loaded and planned at the start, then step/total, the metrics,
  elapsed and remaining time, at most every `every_s` seconds and always on the last step;
- a Prefect progress artifact for the stage, updated as it goes, 100% at the end;
- live MLflow metrics on the stage's child run (`live/<name>` at that step), and the
  machine's CPU, memory and GPU figures through MLflow's system-metrics monitor;
- `progress.json` in the run folder, which `shomin runs --watch` reads from another shell.
Nothing here may fail a stage: a watcher that cannot reach Prefect or MLflow goes quiet.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from shomin.tasks.ground.progress import Report
from shomin.tasks.ground.rundir import write_json

fallback = logging.getLogger("shomin")
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)   # its start/stop lines, once per stage


def _logger():
    try:
        from prefect import get_run_logger
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a Prefect run: plain logging
        return fallback


class StageWatcher:
    def __init__(self, stage: str, run_folder: Path, tracker=None, mlflow_run: str | None = None,
                 every_s: float = 10.0, intro: str = ""):
        self.stage, self.run_folder, self.tracker, self.mlflow_run = stage, run_folder, tracker, mlflow_run
        self.every_s, self.intro, self.last_line = every_s, intro, 0.0
        self.artifact = None
        self.monitor = None

    # ---------------------------------------------------------------- the Watcher protocol

    def started(self, what: str, total: int | None) -> None:
        _logger().info(" ".join(part for part in (what, self.intro) if part))
        self._quietly(self._create_artifact, what)
        self._quietly(self._start_monitor)
        self._write(None, what)

    def step(self, report: Report) -> None:
        now = time.time()
        if now - self.last_line >= self.every_s or (report.total and report.step >= report.total):
            self.last_line = now
            _logger().info(report.line())
        if self.artifact is not None and not self._quietly(self._update_artifact, 100 * report.fraction):
            self.artifact = None   # the Prefect server is away: stop asking it (each ask retries for a minute)
        if self.tracker is not None and self.mlflow_run:
            self._quietly(self.tracker.log_live, self.mlflow_run, report.metrics, report.step)
            if self.tracker.lost:   # its server died: stop sampling into it
                self.close()
        self._write(report, None)

    def finished(self, line: str) -> None:
        _logger().info(line)
        if self.artifact is not None:
            self._quietly(self._update_artifact, 100.0)
        self.close()
        self._write(None, line, done=True)

    # ---------------------------------------------------------------- the parts

    def close(self) -> None:
        if self.monitor is not None:
            self._quietly(self.monitor.finish)
            self.monitor = None

    def _create_artifact(self, what: str) -> None:
        from prefect.artifacts import create_progress_artifact
        from prefect.context import TaskRunContext
        if TaskRunContext.get() is not None:
            self.artifact = create_progress_artifact(0.0, key=f"{self.stage.replace('_', '-')}-progress",
                                                     description=what)

    def _update_artifact(self, percent: float) -> None:
        from prefect.artifacts import update_progress_artifact
        update_progress_artifact(self.artifact, round(percent, 1))

    def _start_monitor(self) -> None:
        """MLflow's own system-metrics sampler (psutil; GPU figures when pynvml is installed)."""
        if self.tracker is not None and self.mlflow_run:
            self.monitor = self.tracker.system_monitor(self.mlflow_run)

    def _write(self, report: Report | None, line: str | None, done: bool = False) -> None:
        state = {"stage": self.stage, "updated_at": time.time(), "done": done}
        if report is not None:
            state.update(step=report.step, total=report.total, metrics=report.metrics, elapsed_s=report.elapsed,
                         remaining_s=report.remaining, line=report.line())
        else:
            state["line"] = line
        self._quietly(write_json, self.run_folder / "progress.json", state)

    def _quietly(self, fn, *args) -> bool:
        """fn(*args); False when it failed (logged at debug level: watching must never cost the run)."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001
            fallback.debug("shomin: watcher %s: %s", getattr(fn, "__name__", fn), e)
            return False
        return True
