"""Stage env_check: record the environment and the memory plan; fail before anything loads.

Loading a 20B model only to die of OOM in step one of training wastes minutes and
says nothing useful. The flow hands this stage the plan (tasks/registry.plan_for:
each present stage's terms from its registry entry, against this machine's free
memory); the stage refuses a plan that does not fit, with one line naming what to
lower, and writes env.json and plan.txt for people and for later stages.
"""
from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field
from shomin.tasks.ground.contract import GIB, Inputs, Stage, StageContext
from shomin.tasks.ground.errors import ConfigError, MemoryPlanError
from shomin.tasks.ground.records import EnvResult
from shomin.tasks.ground.rundir import staged_dir, write_json, write_text
from shomin.tasks.ground.settings import Strict
from shomin.tasks.models.loading import EIGHT_BIT_NEEDS_CUDA, resolve_device
from shomin.tasks.models.memory import MemoryPlan, failure


class EnvCheckSettings(Strict):
    enforce_memory_plan: bool = Field(True, description="Fail before loading anything when the predicted peak does not fit.")
    headroom: float = Field(0.9, gt=0, le=1, description="Share of free device memory the plan may use.")


def run(ctx: StageContext, inputs: Inputs) -> EnvResult:
    """ctx.plan is {"plan", "environment", "shape"} from tasks/registry.plan_for."""
    t0 = time.time()
    device = resolve_device(ctx.pipeline_device)  # cuda asked for but absent: fail here
    quantizations = {ctx.model.quantization, *(ctx.plan or {}).get("quantizations", [])}
    if device == "cpu" and "8bit" in quantizations:
        raise ConfigError(f"quantization: {EIGHT_BIT_NEEDS_CUDA}")
    plan = MemoryPlan.model_validate(ctx.plan["plan"])
    if ctx.settings.enforce_memory_plan and plan.fits is False:
        raise MemoryPlanError(failure(plan))
    env = ctx.plan["environment"]
    with staged_dir(ctx.out_dir) as tmp:
        write_json(tmp / "env.json", {**env, "model_shape": ctx.plan["shape"], "plan": plan.model_dump()})
        write_text(tmp / "plan.txt", plan.table())
    out = Path(ctx.out_dir)
    metrics = {"peak_gib": plan.peak_bytes / GIB, "num_parameters": float(plan.num_parameters)}
    if plan.device_free_bytes is not None:
        metrics["device_free_gib"] = plan.device_free_bytes / GIB
    return EnvResult(stage="env_check", output_dir=str(out), plan=plan.model_dump(), versions=env["versions"],
                     devices=env["devices"], metrics=metrics, seconds=time.time() - t0,
                     artifacts={"env": str(out / "env.json"), "plan": str(out / "plan.txt")})


def check(pipeline, settings: EnvCheckSettings, before_run: bool) -> None:
    from shomin.tasks.ground.hub import check_source
    check_source(pipeline.model)   # the plan reads the model's config


STAGE = Stage("env_check", EnvCheckSettings, run, check=check, cached=False, checks_plan=True,
              help="Environment and memory plan; fails before anything loads when the plan does not fit.")
