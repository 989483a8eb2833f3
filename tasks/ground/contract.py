"""The stage contract: what a stage declares once, and everything else reads.

A stage is one module holding a settings class, a `run(context, inputs) -> result`
and a `STAGE = Stage(...)` entry; adding it to tasks/registry.py is the one other
line. From the entry come: the order of a pipeline and its YAML keys and JSON schema
(the registry's place in the list and `settings`), the dependency check (`needs`),
the Prefect task, its retries and cache key (`cached`, `retries`, `identity`), the
checkpoint store (`checkpoints`), the memory plan (`plan`, `memory`), the advice on
running out of memory (`lower`, `advice`) and the checks run before anything loads
(`check`).

What crosses from the flow into a stage is a `StageContext` (specs, seed, device,
folders, plan) and the earlier stages' results (small serialisable records, never
live models): Prefect can cache both and a rerun can skip finished stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict
from shomin.tasks.ground.records import StageResult
from shomin.tasks.ground.settings import DatasetSpec, ModelSpec

GIB = 1024 ** 3


class StageContext(BaseModel):
    """What the flow hands a stage besides the earlier results. `identity` of the stage's
    entry says which of `model`, `dataset`, `seed`, `device` enter its cache key; the
    folders and the plan never do (they say where and how much, not what)."""
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    stage: str
    settings: Any
    model: ModelSpec
    dataset: DatasetSpec | None = None
    seed: int = 42
    device: str = "cpu"
    pipeline_device: str = "auto"      # as written in the YAML (env_check plans for `cuda` on any machine)
    out_dir: str
    checkpoint_dir: str | None = None  # checkpointing stages: a folder outside the run, keyed by inputs
    plan: dict | None = None           # registry.plan_context: {"plan": MemoryPlan dump, "environment", ...}

    def planned_peak_gib(self, stage: str | None = None) -> float | None:
        """What the memory plan predicted for this (or another) stage, if there is a plan."""
        try:
            return self.plan["plan"]["stages"][stage or self.stage]["total"] / GIB
        except (TypeError, KeyError):
            return None

    def checkpoints(self) -> Path:
        """Where this stage keeps resumable checkpoints: the flow's keyed folder, or beside the output."""
        out = Path(self.out_dir)
        return Path(self.checkpoint_dir) if self.checkpoint_dir else out.with_name(f".{out.name}.checkpoints")


Inputs = dict[str, StageResult]
RunFn = Callable[[StageContext, Inputs], StageResult]
# (pipeline, this stage's settings, before_run) -> None; raises ConfigError naming the field
CheckFn = Callable[[Any, Any, bool], None]


@dataclass(frozen=True)
class Stage:
    """One registry entry. Every field but name, settings and run has a default that fits
    a plain stage: cached, no retries, no checkpoints, no memory terms, no checks."""
    name: str
    settings: type[BaseModel]
    run: RunFn
    help: str = ""
    needs: tuple[str, ...] = ()            # stages that must come before; their results are inputs
    uses: tuple[str, ...] = ()             # earlier stages whose results are inputs when present
    identity: tuple[str, ...] = ("model", "dataset", "seed", "device")
    cached: bool = True                    # False: runs every time (env_check measures the machine)
    retries: int = 0                       # only where a retry can help (network fetches)
    checkpoints: bool = False              # resumable: gets a locked checkpoint folder keyed by inputs
    needs_dataset_spec: bool = False       # the pipeline must have a top-level `dataset:` section
    lower: tuple[str, ...] = ()            # settings to lower when memory runs out, most useful first
    advice: str = ""                       # what else helps when memory runs out
    memory: Literal["device", "host"] = "device"   # where its peak lives (merge: host RAM)
    plan: Callable[..., dict[str, int]] | None = None   # (settings, PlanInputs) -> terms incl. "total"
    check: CheckFn | None = None
    checks_plan: bool = False              # the flow computes the memory plan of every present stage for it

    def inputs_of(self, results: dict[str, StageResult]) -> Inputs:
        return {name: results[name] for name in (*self.needs, *self.uses) if name in results}

    def lower_hint(self, settings: Any = None) -> str:
        """'lower stages.sft.micro_batch_size (now 4), ..., or <advice>' — for OOM and the plan."""
        knobs = [f"stages.{self.name}.{k}" + (f" (now {getattr(settings, k)})" if hasattr(settings, k) else "")
                 for k in self.lower]
        advice = self.advice or "use a smaller model"
        return (f"lower {', '.join(knobs)}, or " if knobs else "") + advice
