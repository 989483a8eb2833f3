"""How far a running stage has got, told by the stage core to whoever watches.

A stage core knows its steps (SFT's optimizer steps, PPO's rollouts, evaluate's phases)
but must not know Prefect or MLflow. It calls `progress(...)` and reports each step
with its metrics; the flow installs a watcher (flows/watch.py) that turns the reports
into Prefect log lines and a progress artifact, live MLflow metrics and the run
folder's progress.json. With no watcher installed (a stage run directly, in tests),
reports go to Python logging and nothing else happens.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Protocol

log = logging.getLogger("shomin")


class Watcher(Protocol):
    def started(self, what: str, total: int | None) -> None: ...
    def step(self, report: "Report") -> None: ...
    def finished(self, line: str) -> None: ...


# what a log line shows, in this order, under these names (MLflow and progress.json get every metric)
SHOWN = {"loss": "loss", "reward_mean": "reward", "kl": "kl", "kl_coef": "kl_coef", "learning_rate": "lr",
         "lr": "lr", "grad_norm": "grad_norm", "tokens_per_s": "tokens/s", "step_seconds": "s/step",
         "loss_before": "loss_before", "loss_after": "loss_after", "reward_gain": "reward_gain", "kl_ppo": "kl_ppo"}


class Report:
    """One step: where the stage is, its latest metrics, and the time it has taken and needs."""

    def __init__(self, stage: str, step: int, total: int | None, metrics: dict[str, float], elapsed: float,
                 first_step: int = 0):
        self.stage, self.step, self.total, self.metrics, self.elapsed = stage, step, total, metrics, elapsed
        done = step - first_step   # a resumed stage: its rate from the steps this process ran
        self.remaining = elapsed / done * (total - step) if total and done > 0 else None

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0

    def line(self) -> str:
        """`sft step 8/16 (50%) loss 2.31 lr 3.0e-04 | 4m10s elapsed, 4m10s left`"""
        where = f"{self.stage} step {self.step}/{self.total} ({self.fraction:.0%})" if self.total \
            else f"{self.stage} step {self.step}"
        picked = [k for k in SHOWN if k in self.metrics] or list(self.metrics)
        shown = " ".join(f"{SHOWN.get(k, k)} {_number(self.metrics[k])}" for k in picked)
        left = f", {clock(self.remaining)} left" if self.remaining is not None else ""
        return f"{where} {shown} | {clock(self.elapsed)} elapsed{left}".replace("  ", " ")


def _number(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class _Logged:
    """The watcher when none is installed: a log line per report."""

    def started(self, what: str, total: int | None) -> None:
        log.info(what)

    def step(self, report: Report) -> None:
        log.info(report.line())

    def finished(self, line: str) -> None:
        log.info(line)


_watcher: ContextVar[Watcher | None] = ContextVar("shomin_watcher", default=None)


@contextlib.contextmanager
def watched_by(watcher: Watcher) -> Iterator[Watcher]:
    """Installs a watcher for the stage run inside the block (this thread and its context)."""
    token = _watcher.set(watcher)
    try:
        yield watcher
    finally:
        _watcher.reset(token)


class Progress:
    """What a stage holds while it runs: `update(step, metrics)` per step, `done(line)` at the end."""

    def __init__(self, stage: str, what: str, total: int | None, first_step: int = 0):
        self.stage, self.total, self.first_step, self.t0 = stage, total, first_step, time.time()
        self.watcher = _watcher.get() or _Logged()
        self.watcher.started(what, total)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        self.watcher.step(Report(self.stage, step, self.total, numbers, time.time() - self.t0, self.first_step))

    def done(self, line: str) -> None:
        self.watcher.finished(f"{self.stage} done in {clock(time.time() - self.t0)}: {line}")


def progress(stage: str, what: str, total: int | None = None, first_step: int = 0) -> Progress:
    return Progress(stage, what, total, first_step)
