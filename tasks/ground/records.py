"""The results stages hand to later stages: small, serialisable, safe to cache.

A stage's result names files (paths), never live models. The records other stages
read live here, below every stage, so no stage imports another; a stage whose result
nobody reads may define its own subclass of `StageResult` in its module.
"""
from __future__ import annotations

from pydantic import BaseModel, Field
from shomin.tasks.ground.settings import RewardSettings


class StageResult(BaseModel):
    """What every stage returns."""
    stage: str
    output_dir: str
    metrics: dict[str, float] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict)
    seconds: float = 0.0
    resumed_from_step: int | None = None


class EnvResult(StageResult):
    plan: dict            # tasks/models/memory.MemoryPlan, dumped
    versions: dict[str, str]
    devices: list[dict]


class ModelResult(StageResult):
    model_path: str
    tokenizer_path: str
    num_parameters: int
    architecture: str


class DataResult(StageResult):
    train_path: str
    eval_path: str
    format: str
    n_train: int
    n_eval: int


class SftResult(StageResult):
    adapter_path: str
    steps: int


class MergeResult(StageResult):
    merged_path: str


class PolicyRecord(BaseModel):
    """How a tuned policy was sampled and judged, so a later stage can do it again the same way."""
    quantization: str
    reward: RewardSettings
    batch_size: int
    query_min_tokens: int
    query_max_tokens: int
    response_max_tokens: int
    top_k: int
    top_p: float
    temperature: float
    cuda_graphs: bool = True   # on CUDA, rollouts decode through replayed graphs (stages.ppo.cuda_graphs)


class PpoResult(StageResult):
    adapter_path: str
    value_head_path: str
    merged_path: str | None = None
    steps: int
    policy: PolicyRecord


class RewardModelResult(StageResult):
    """A LoRA reward model: `model_path` holds the adapter and the trained score head on top of
    `base_path` (the merged SFT model); peft's AutoPeftModelForSequenceClassification loads it."""
    model_path: str
    base_path: str


class TunedPolicyResult(StageResult):
    """A policy LoRA on the merged SFT model, trained by dpo or grpo; with the adapter disabled the
    same weights are the reference. `policy` says how grpo sampled and judged (None for dpo)."""
    adapter_path: str
    steps: int
    policy: PolicyRecord | None = None


class EvalResult(StageResult):
    eval_json: str
    eval_md: str
