"""Running one stage core the way the flow does (registry.execute), without Prefect."""
from __future__ import annotations

from pathlib import Path

from shomin.tasks import registry
from shomin.tasks.ground.contract import StageContext


def stage_context(name: str, settings, out_dir, *, model, dataset=None, seed: int = 42, device: str = "cpu",
                  checkpoint_dir=None, plan: dict | None = None, pipeline_device: str | None = None) -> StageContext:
    return StageContext(stage=name, settings=settings, model=model, dataset=dataset, seed=seed, device=device,
                        pipeline_device=pipeline_device or device, out_dir=str(Path(out_dir)),
                        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None, plan=plan)


def run_stage(name: str, settings, out_dir, *, inputs: dict | None = None, **kwargs):
    """The registered stage `name` on these settings and earlier results, as the flow runs it."""
    ctx = stage_context(name, settings, out_dir, **kwargs)
    return registry.execute(registry.get(name), ctx, inputs or {})
