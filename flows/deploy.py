"""Scheduled reruns: a pipeline's `schedule:` becomes a Prefect deployment of the `shomin` flow.

    shomin server --detach           # Prefect (and MLflow) on 127.0.0.1, state in this folder
    shomin serve                     # every pipeline with a schedule, until Ctrl-C
    shomin serve imdb-rlhf-local     # just these

`serve` registers one deployment per scheduled pipeline (named after it, with
the cron, timezone, `active` flag and `overrides` of its schedule) and runs the
scheduled flow runs in subprocesses of this process. It needs a Prefect server
(scheduling is the server's job; the throwaway server of `shomin run` has no
scheduler): PREFECT_API_URL, or the server `shomin server` started here.

For more than one machine, prefect.yaml holds the same deployments for
`prefect deploy` to a work pool (see README, "Watching runs").
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.ground.settings import PipelineBase as Pipeline
from shomin.tasks.registry import load_config

QUIET_ENV = {  # progress bars off for unattended runs; logs stay
    "TQDM_DISABLE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "warning",
    "SHOMIN_QUIET": "1",
}


def override_list(overrides: dict[str, Any]) -> list[str]:
    """A schedule's overrides mapping as `--set` strings (values as YAML flow scalars)."""
    import yaml
    out = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
        if text.endswith("\n...") or text.endswith("..."):
            text = text.rsplit("\n", 1)[0].removesuffix("...").strip()
        out.append(f"{key}={text}")
    return out


def scheduled(config_path: str | Path, names: list[str] | None = None) -> list[Pipeline]:
    """The pipelines to deploy: all with a schedule, or the named ones (each must have one)."""
    pipelines = load_config(config_path)
    if names:
        missing = [n for n in names if n not in pipelines]
        if missing:
            raise ConfigError(f"{config_path}: no pipeline named '{missing[0]}' (known: {', '.join(pipelines)})")
        unscheduled = [n for n in names if pipelines[n].schedule is None]
        if unscheduled:
            raise ConfigError(f"{config_path}: pipelines.{unscheduled[0]}: has no `schedule:` to serve")
        return [pipelines[n] for n in names]
    return [p for p in pipelines.values() if p.schedule is not None]


def deployment_parameters(p: Pipeline, config_path: str | Path, workdir: str | Path) -> dict[str, Any]:
    return {"pipeline": p.name, "config": str(Path(config_path).resolve()),
            "overrides": override_list(p.schedule.overrides) if p.schedule else [],
            "workdir": str(Path(workdir).resolve()), "refresh": False}


def build_deployments(config_path: str | Path = "pipelines.yaml", names: list[str] | None = None,
                      workdir: str | Path = ".") -> list:
    """RunnerDeployments of flows.pipeline:pipeline_flow, one per scheduled pipeline."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron
    from shomin.flows.pipeline import pipeline_flow
    pipelines = scheduled(config_path, names)
    # validate every override now, not at 3 a.m.
    from shomin.tasks.registry import load_pipeline
    for p in pipelines:
        load_pipeline(config_path, p.name, override_list(p.schedule.overrides))
    deployments = []
    for p in pipelines:
        s = p.schedule
        deployments.append(pipeline_flow.to_deployment(
            name=p.name,
            schedule=Cron(s.cron, timezone=s.timezone, active=s.active),
            parameters=deployment_parameters(p, config_path, workdir),
            description=p.description or f"shomin pipeline {p.name}",
            tags=["shomin", p.name],
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
    return deployments


def serve(config_path: str | Path = "pipelines.yaml", names: list[str] | None = None,
          workdir: str | Path = ".", quiet: bool = True, limit: int | None = 1) -> None:
    """Register the deployments and run their scheduled flow runs until interrupted."""
    if quiet:
        for k, v in QUIET_ENV.items():  # inherited by the subprocess of each flow run
            os.environ.setdefault(k, v)
    deployments = build_deployments(config_path, names, workdir)
    if not deployments:
        raise ConfigError(f"{config_path}: no pipeline has a `schedule:`; nothing to serve")
    from prefect import serve as prefect_serve
    # limit=1: fine-tuning runs compete for one GPU; scheduled runs queue rather than overlap
    prefect_serve(*deployments, limit=limit, print_starting_message=not quiet)


def prefect_yaml_deployments(config_path: str | Path = "pipelines.yaml") -> list[dict[str, Any]]:
    """What prefect.yaml's `deployments:` should say for this pipelines file (checked by a test)."""
    out = []
    for p in scheduled(config_path):
        s = p.schedule
        out.append({"name": p.name, "entrypoint": "flows/pipeline.py:pipeline_flow",
                    "parameters": {"pipeline": p.name, "config": "pipelines.yaml",
                                   "overrides": override_list(s.overrides)},
                    "schedules": [{"cron": s.cron, "timezone": s.timezone, "active": s.active}]})
    return out
