"""Thin Prefect tasks around the Prefect-free stage cores in tasks/.

Caching: a stage's cache key is a hash of its settings and its upstream
results (never of the output folder), so rerunning a pipeline with the same
inputs skips finished stages. Retries only where a retry can help (network
fetches); a training stage that fails is resumed from its checkpoint by
running the command again, not retried blindly.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import data, env_check, evaluate, merge, model, ppo, sft

CODE_VERSION = "1"  # bump when a stage's outputs change meaning, to invalidate old caches
NOT_HASHED = {"out_dir", "checkpoint_dir"}


def _canonical(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        dump = value.model_dump(mode="json")
        dump.pop("seconds", None)  # timing is not identity
        return dump
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def stage_key(stage: str, parameters: dict[str, Any]) -> str:
    payload = {k: _canonical(v) for k, v in sorted(parameters.items()) if k not in NOT_HASHED}
    blob = json.dumps({"stage": stage, "v": CODE_VERSION, "inputs": payload}, sort_keys=True, default=str)
    return f"shomin-{stage}-" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def _key_fn(stage: str):
    return lambda context, parameters: stage_key(stage, parameters)


COMMON = dict(persist_result=True)


def _transient(task, task_run, state) -> bool:
    """Retry network hiccups, never a user mistake: a ConfigError fails the same way twice."""
    from tasks.config import ConfigError
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable state is no reason not to retry
        return True
    return not isinstance(error, ConfigError)


RETRY = dict(retries=2, retry_delay_seconds=10, retry_condition_fn=_transient)


@task(name="env_check", cache_policy=NO_CACHE, persist_result=False)
def env_check_task(settings, pipeline, out_dir):
    # never cached: the machine's free memory is the point of this stage
    return env_check.run(settings, pipeline, out_dir)


@task(name="model_init", cache_key_fn=_key_fn("model_init"), **RETRY, **COMMON)
def model_init_task(settings, spec, out_dir):
    return model.run(settings, spec, out_dir)


@task(name="dataset", cache_key_fn=_key_fn("dataset"), **RETRY, **COMMON)
def dataset_task(settings, spec, seed, out_dir):
    return data.run(settings, spec, seed, out_dir)


@task(name="sft", cache_key_fn=_key_fn("sft"), **COMMON)
def sft_task(settings, spec, model_res, data_res, device, seed, out_dir, checkpoint_dir):
    return sft.run(settings, spec, model_res, data_res, out_dir, device=device, seed=seed,
                   checkpoint_dir=checkpoint_dir)


@task(name="merge", cache_key_fn=_key_fn("merge"), **COMMON)
def merge_task(settings, spec, model_res, sft_res, out_dir):
    return merge.run(settings, spec, model_res, sft_res, out_dir)


@task(name="ppo", cache_key_fn=_key_fn("ppo"), **COMMON)
def ppo_task(settings, spec, merge_res, data_res, device, seed, out_dir, checkpoint_dir):
    return ppo.run(settings, spec, merge_res, data_res, out_dir, device=device, seed=seed,
                   checkpoint_dir=checkpoint_dir)


@task(name="evaluate", cache_key_fn=_key_fn("evaluate"), **COMMON)
def evaluate_task(settings, spec, model_res, data_res, adapter_path, merged_path, ppo_adapter_path,
                  ppo_settings, device, seed, out_dir):
    return evaluate.run(settings, spec, model_res, data_res, out_dir, adapter_path=adapter_path,
                        merged_path=merged_path, ppo_adapter_path=ppo_adapter_path,
                        ppo_settings=ppo_settings, device=device, seed=seed)
