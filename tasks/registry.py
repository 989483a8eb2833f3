"""The stage registry: the one list of stages, and everything derived from it.

Adding a stage is its module (tasks/stages/) and one line in `STAGES`. From the list
come the order of a pipeline, the typed `stages:` section and its JSON schema, the
dependency checks, the checks run before anything loads, the memory plan, the cache
key and the advice on running out of memory. flows/ only composes what is here.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, create_model
from shomin.tasks.ground import config as yaml_config
from shomin.tasks.ground.contract import GIB, Inputs, Stage, StageContext
from shomin.tasks.ground.errors import ConfigError, DiskFull, OutOfMemory, is_disk_full
from shomin.tasks.ground.records import StageResult
from shomin.tasks.ground.settings import PipelineBase, StagesBase, Strict
from shomin.tasks.models.loading import EIGHT_BIT_NEEDS_CUDA, resolve_device
from shomin.tasks.stages import dataset, dpo, env_check, evaluate, export, grpo, merge, model_init, ppo, reward_model, sft

STAGES: list[Stage] = [
    env_check.STAGE,
    model_init.STAGE,
    dataset.STAGE,
    sft.STAGE,
    merge.STAGE,
    reward_model.STAGE,
    ppo.STAGE,
    dpo.STAGE,
    grpo.STAGE,
    evaluate.STAGE,
    export.STAGE,
]
CODE_VERSION = "2"  # bump when a stage's outputs change meaning, to invalidate old caches
_models: dict[tuple, tuple[type[BaseModel], type[BaseModel]]] = {}


def register(stage: Stage, after: str | None = None) -> Stage:
    """Add a stage (after `after`, else last). The shipped stages are listed in STAGES."""
    if any(s.name == stage.name for s in STAGES):
        raise ValueError(f"stage '{stage.name}' is already registered")
    at = [s.name for s in STAGES].index(after) + 1 if after else len(STAGES)
    STAGES.insert(at, stage)
    return stage


def unregister(name: str) -> None:
    STAGES[:] = [s for s in STAGES if s.name != name]


def get(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)


def present(p: PipelineBase) -> list[Stage]:
    """The pipeline's stages, in registry order."""
    return [s for s in STAGES if getattr(p.stages, s.name, None) is not None]


# ---------------------------------------------------------------- typed settings from the registry


def models() -> tuple[type[BaseModel], type[BaseModel]]:
    """(Pipeline, Config) pydantic classes for the stages registered now."""
    key = tuple((s.name, s.settings) for s in STAGES)
    if key not in _models:
        fields = {s.name: (s.settings | None, Field(None, description=s.help)) for s in STAGES}
        stages = create_model("Stages", __base__=StagesBase, **fields)
        stages.ORDER = tuple(s.name for s in STAGES)
        stages.NEEDS = {s.name: s.needs for s in STAGES}
        stages.NEEDS_DATASET = frozenset(s.name for s in STAGES if s.needs_dataset_spec)
        pipeline = create_model("Pipeline", __base__=PipelineBase, stages=(stages, ...))
        config = create_model("Config", __base__=Strict, pipelines=(dict[str, pipeline], ...))
        _models[key] = (pipeline, config)
    return _models[key]


def load_config(path: str | Path = "pipelines.yaml") -> dict[str, Any]:
    """name -> typed pipeline, for the whole file."""
    return yaml_config.load_pipelines(path, models()[0])


def load_pipeline(path: str | Path, name: str, overrides: list[str] | dict | None = None) -> Any:
    return yaml_config.load_pipeline(path, name, models()[0], overrides)


def config_schema() -> dict:
    """JSON Schema of pipelines.yaml (pipelines.schema.json is this, for the YAML language server)."""
    schema = models()[1].model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://shomin.invalid/pipelines.schema.json", "title": "shomin pipelines.yaml",
            "description": "Pipelines of shomin; the settings are the pydantic classes of tasks/ground/settings.py "
                           "and of each stage module in tasks/stages/.",
            **{k: v for k, v in schema.items() if k != "title"}}


# ---------------------------------------------------------------- before a run


def needs_gpu(p: PipelineBase) -> bool:
    return "8bit" in quantizations(p)


def quantizations(p: PipelineBase) -> list[str]:
    """model.quantization and every present stage's own `quantization` setting."""
    own = [getattr(getattr(p.stages, s.name), "quantization", None) for s in present(p)]
    return [p.model.quantization, *[q for q in own if isinstance(q, str)]]


def check_pipeline(p: PipelineBase, file: str = "pipelines.yaml", before_run: bool = False) -> None:
    """Every check that needs no model weights, from each present stage's entry; `before_run`
    adds what only a run needs (offline, hub models and datasets must already be cached).
    Errors are ConfigError naming the file and the field path (or the dataset file and row)."""
    try:
        if before_run:
            resolve_device(p.device)  # cuda asked for, none here
        if needs_gpu(p):
            import torch
            if p.device == "cpu" or not torch.cuda.is_available():
                field = "model.quantization" if p.model.quantization == "8bit" else next(
                    f"stages.{s.name}.quantization" for s in present(p)
                    if getattr(getattr(p.stages, s.name), "quantization", None) == "8bit")
                raise ConfigError(f"{field}: {EIGHT_BIT_NEEDS_CUDA}")
        for stage in present(p):
            if stage.check is not None:
                stage.check(p, getattr(p.stages, stage.name), before_run)
    except ConfigError as e:
        raise type(e)(locate(str(e), file, p.name)) from None


def locate(msg: str, file: str, name: str) -> str:
    """`model.source: ...` -> `FILE: pipelines.NAME.model.source: ...`; messages naming a data file stay as they are."""
    if msg.startswith(("model.", "dataset.", "stages.", "device:", "tracking.")):
        return f"{file}: pipelines.{name}.{msg}"
    if msg.startswith("pipelines."):
        return f"{file}: {msg}"
    return msg


# ---------------------------------------------------------------- the memory plan


def plan_memory(p: PipelineBase, shape: dict, device: str, free_bytes: int | None, total_bytes: int | None,
                **kwargs):
    """The plan of the present stages that declare memory terms (see tasks/models/memory.py)."""
    from shomin.tasks.models.memory import StageTerms
    from shomin.tasks.models.memory import plan_memory as add_up
    terms = {s.name: StageTerms(s.plan, getattr(p.stages, s.name), s.memory, s.lower_hint())
             for s in present(p) if s.plan is not None}
    return add_up(terms, p.model, shape, device, free_bytes, total_bytes, **kwargs)


def plan_for(p: PipelineBase, headroom: float | None = None) -> dict:
    """The plan on this machine: {"plan": MemoryPlan, "environment", "shape", "quantizations"}. A cuda
    pipeline previewed on a machine without CUDA still gets a plan, with fit unknown."""
    where = _plan_inputs(p, headroom)
    plan = plan_memory(p, *where["args"], **where["kwargs"])
    return {"plan": plan, "environment": where["env"], "shape": where["args"][0], "quantizations": quantizations(p)}


def _plan_inputs(p: PipelineBase, headroom: float | None) -> dict:
    """What plan_memory needs besides the pipeline: the model's shape, the device and its budget."""
    from shomin.tasks.models.environment import environment
    from shomin.tasks.models.memory import model_shape
    env = environment()
    device = "cuda" if p.device == "cuda" else resolve_device(p.device)
    cache_dir = p.stages.model_init.cache_dir if getattr(p.stages, "model_init", None) else None
    shape = model_shape(p.model, cache_dir)
    cpu = next(d for d in env["devices"] if d["type"] == "cpu")
    dev = cpu if device == "cpu" else next((d for d in env["devices"] if d.get("index") == 0), {})
    if headroom is None:
        headroom = next((getattr(p.stages, s.name).headroom for s in present(p) if s.checks_plan), 0.9)
    free, total = dev.get("free_bytes"), dev.get("total_bytes")
    if p.device_memory_gib is not None:   # the card the user plans for (or the share of it theirs)
        cap = int(p.device_memory_gib * GIB)
        free, total = min(free or cap, cap), min(total or cap, cap)
    return {"env": env, "args": (shape, device, free, total),
            "kwargs": dict(headroom=headroom, ram_free_bytes=cpu["free_bytes"], cap_gib=p.device_memory_gib)}


def longest_context(p: PipelineBase, resolution: int = 256) -> tuple[int, dict]:
    """The longest stages.sft.max_seq_length (at its micro_batch_size) whose planned SFT peak
    fits the budget env_check holds the run to: doubling, then bisection to `resolution`
    tokens. Returns (tokens, the SFT terms at that length); tokens 0 when not even
    `resolution` fits. ConfigError when there is no sft stage or no budget to fit."""
    where = _plan_inputs(p, None)
    free, headroom = where["args"][2], where["kwargs"]["headroom"]
    if getattr(p.stages, "sft", None) is None:
        raise ConfigError("shomin plan --longest-context: this pipeline has no sft stage")
    if free is None:
        raise ConfigError("shomin plan --longest-context: no GPU here to measure; "
                          "say which card with --set device_memory_gib=24")

    def sft_terms(tokens: int) -> dict:
        stages = p.stages.model_copy(update={"sft": p.stages.sft.model_copy(update={"max_seq_length": tokens})})
        return plan_memory(p.model_copy(update={"stages": stages}), *where["args"], **where["kwargs"]).stages["sft"]

    def fits(tokens: int) -> bool:
        return sft_terms(tokens)["total"] <= headroom * free
    lo, hi = 0, resolution
    while fits(hi) and hi < 1 << 24:
        lo, hi = hi, hi * 2
    while hi - lo > resolution:
        mid = (lo + hi) // 2 // resolution * resolution
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, (sft_terms(lo) if lo else {})


def plan_context(p: PipelineBase) -> dict:
    """plan_for, serialisable: what the flow hands env_check and, for OOM advice, every later stage."""
    found = plan_for(p)
    return {**found, "plan": found["plan"].model_dump()}


# ---------------------------------------------------------------- running one stage


def context(stage: Stage, p: PipelineBase, device: str, out_dir: str | Path, **extra: Any) -> StageContext:
    return StageContext(stage=stage.name, settings=getattr(p.stages, stage.name), model=p.model, dataset=p.dataset,
                        seed=p.seed, device=device, pipeline_device=p.device, out_dir=str(out_dir), **extra)


def stage_key(stage: Stage, ctx: StageContext, inputs: Inputs) -> str:
    """Identity of a stage's work: its settings, the context fields it declares, its inputs
    (never the output folder, the checkpoint folder or the plan, nor how long inputs took)."""
    def canonical(value: Any) -> Any:
        if isinstance(value, BaseModel):
            dump = value.model_dump(mode="json")
            dump.pop("seconds", None)
            return dump
        return value
    payload = {"settings": canonical(ctx.settings), **{f: canonical(getattr(ctx, f)) for f in stage.identity},
               "inputs": {k: canonical(v) for k, v in sorted(inputs.items())}}
    blob = json.dumps({"stage": stage.name, "v": CODE_VERSION, "inputs": payload}, sort_keys=True, default=str)
    return f"shomin-{stage.name}-" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def execute(stage: Stage, ctx: StageContext, inputs: Inputs) -> StageResult:
    """Run one stage core: checkpointing stages inside the checkpoint store's claim (lock; the
    checkpoints removed after success), a CUDA out-of-memory turned into one line of advice."""
    import torch
    from shomin.tasks.ground import checkpoints
    from shomin.tasks.models.environment import PeakMemory
    from shomin.tasks.models.loading import free
    from shomin.tasks.models.memory import oom_message
    try:
        with PeakMemory(ctx.device) as peaks:   # each stage's own peaks, in summary.json and MLflow
            if not stage.checkpoints:
                result = stage.run(ctx, inputs)
            else:
                with checkpoints.claim(ctx.checkpoints()) as claim:
                    result = stage.run(ctx.model_copy(update={"checkpoint_dir": str(claim.folder)}), inputs)
        result.metrics.update(peaks.figures)
        return result
    except torch.cuda.OutOfMemoryError:
        hint = stage.lower_hint(ctx.settings)
        cap = ((ctx.plan or {}).get("plan") or {}).get("device_cap_gib")
        raise OutOfMemory(oom_message(stage.name, hint, ctx.planned_peak_gib(), cap)) from None
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise DiskFull(disk_full_message(stage.name, e, ctx.out_dir)) from None
    finally:
        # A trainer and its model sit in reference cycles (callbacks, accelerate): without a collection
        # here the SFT model's 20 GiB stayed on the GPU through merge and into ppo (bench/gpu_rlhf20b.py).
        free()


def disk_full_message(stage: str, error: BaseException, out_dir: str) -> str:
    """One line: which folder filled up, how much is free there, how much the stage had written."""
    import shutil
    where = Path(getattr(error, "filename", None) or out_dir)
    folder = next((p for p in (where, *where.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(folder).free
    written = getattr(error, "shomin_written", None)
    wrote = f"; it had written {_size(written)} when the disk filled" if written else ""
    return (f"{stage}: no space left on the disk holding {where.parent if where.suffix else where} "
            f"({_size(free)} free){wrote}; nothing half-written is kept: free space and run the same command again")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else (f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB")
