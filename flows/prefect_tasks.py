"""One Prefect task per registered stage, made from its registry entry.

Caching: a stage's cache key is tasks/registry.stage_key (its settings, the context
fields it declares, its upstream results; never its output folder), so rerunning a
pipeline with the same inputs skips finished stages; a stage that says `cached=False`
(env_check) always runs. Retries only where the entry asks (network fetches) and
never for a user mistake: a ConfigError fails the same way twice. A training stage
that fails is resumed from its checkpoint by running the command again.
"""
from __future__ import annotations

from functools import lru_cache

from prefect import task
from prefect.cache_policies import NO_CACHE
from shomin.tasks import registry
from shomin.tasks.ground.contract import Inputs, Stage, StageContext
from shomin.tasks.ground.errors import ConfigError


def _transient(task, task_run, state) -> bool:
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable state is no reason not to retry
        return True
    return not isinstance(error, ConfigError)


def _key(context, parameters) -> str:
    return registry.stage_key(registry.get(parameters["ctx"].stage), parameters["ctx"], parameters["inputs"])


@lru_cache(maxsize=None)
def _task_for(stage: Stage):
    def run_stage(ctx: StageContext, inputs: Inputs):
        return registry.execute(stage, ctx, inputs)
    caching = dict(cache_key_fn=_key, persist_result=True) if stage.cached else dict(cache_policy=NO_CACHE,
                                                                                    persist_result=False)
    retries = dict(retries=stage.retries, retry_delay_seconds=10, retry_condition_fn=_transient) if stage.retries else {}
    return task(name=stage.name, **caching, **retries)(run_stage)


def stage_task(stage: Stage):
    """The Prefect task of `stage` (one per registry entry, made once)."""
    return _task_for(stage)
