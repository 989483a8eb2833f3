"""Typed settings for pipelines.yaml: one pydantic class per stage, keys 1:1 with the YAML.

Everything a user can get wrong in the file is caught here, before any model
loads: unknown keys (extra="forbid"), wrong types, out-of-range values and
impossible stage orders. Errors are `ConfigError`, one line naming the file and
the field path, so the CLI can print them and exit 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.reward import RewardSettings
from tasks.yamlio import YamlError, load_yaml, parse_scalar

STAGE_ORDER = ("env_check", "model_init", "dataset", "sft", "merge", "ppo", "evaluate")
EMBEDDED_PREFIX = "embedded:"


class ConfigError(ValueError):
    """A user mistake in configuration or input; str() is one line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- pipeline-wide


class ModelSpec(Strict):
    source: str = Field(description="Hub id (org/name), a local folder, or embedded:smollm2-135m-instruct.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    quantization: Literal["none", "8bit", "4bit"] = Field("none", description="Load the base weights quantized with bitsandbytes.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (QLoRA uses nf4).")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantize the quantization constants too (QLoRA).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Matmul dtype of 4-bit layers.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Dtype of unquantized weights; auto = float32 on CPU, bfloat16 on GPU.")
    trust_remote_code: bool = Field(False, description="Run Python code shipped with the model. Off unless you trust it.")


class Template(Strict):
    prompt: str = Field("指示: {instruction}\n入力: {input}\n", description="Prompt when the row has an input.")
    prompt_no_input: str = Field("指示: {instruction}\n", description="Prompt when the input is empty.")
    response: str = Field("応答: {output}", description="The completion the model learns.")

    @model_validator(mode="after")
    def _placeholders(self) -> "Template":
        for name, needed in (("prompt", "{instruction}"), ("prompt_no_input", "{instruction}"), ("response", "{output}")):
            if needed not in getattr(self, name):
                raise ValueError(f"template.{name} must contain {needed}")
        return self


class DatasetSpec(Strict):
    source: str = Field(description="Hub dataset id, or a local .jsonl/.json/.csv/.parquet file.")
    format: Literal["instruction", "text"] = Field("instruction", description="instruction: instruction/input/output columns; text: one text column.")
    text_column: str = Field("text", description="Column holding the text (format: text).")
    split: str = Field("train", description="Hub split to read.")
    template: Template = Field(default_factory=Template)
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of rows held out for evaluation.")
    eval_max_rows: int | None = Field(None, gt=0, description="Cap on held-out rows.")
    max_rows: int | None = Field(None, gt=0, description="Use only this many rows (after a seeded shuffle).")
    allow_extra_columns: bool = Field(False, description="Ignore columns beyond the ones the format needs (hub sets often carry ids, categories).")


class Tracking(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db.")
    experiment: str | None = Field(None, description="MLflow experiment; default: the pipeline name.")
    # field `register` would shadow BaseModel.register; the YAML key is still `register`
    register_model: bool = Field(False, alias="register", description="Register the PPO adapter (RLHF pipelines) or else the merged model as a version of the MLflow model named after the pipeline.")


class Schedule(Strict):
    cron: str = Field(description="Cron expression, e.g. '0 3 * * *'.")
    timezone: str = Field("UTC", description="IANA timezone of the cron.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="--set style overrides for scheduled runs.")
    active: bool = Field(True, description="Whether the schedule fires.")


# ---------------------------------------------------------------- stages


class EnvCheckSettings(Strict):
    enforce_memory_plan: bool = Field(True, description="Fail before loading anything when the predicted peak does not fit.")
    headroom: float = Field(0.9, gt=0, le=1, description="Share of free device memory the plan may use.")


class ModelInitSettings(Strict):
    cache_dir: str | None = Field(None, description="Where hub downloads and the converted embedded model go; default ~/.cache/shomin.")


class DatasetStageSettings(Strict):
    drop_duplicates: bool = Field(True, description="Drop rows whose templated text repeats.")


class LoraSettings(Strict):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field("all-linear", description="Modules to adapt; 'all-linear' or names like [q_proj, v_proj].")


class SftSettings(Strict):
    lora: LoraSettings = Field(default_factory=LoraSettings)
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training set.")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps; -1 = run the epochs.")
    batch_size: int = Field(8, gt=0, description="Effective batch (rows per optimizer step).")
    micro_batch_size: int = Field(4, gt=0, description="Rows per forward pass; batch_size / micro_batch_size steps are accumulated.")
    max_seq_length: int = Field(512, gt=0, description="Tokens per row; longer rows are truncated.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    lr_scheduler: str = Field("linear", description="transformers scheduler name.")
    weight_decay: float = Field(0.0, ge=0)
    completion_only_loss: bool = Field(True, description="Instruction format: loss on the response only.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    logging_steps: int = Field(5, gt=0)
    save_steps: int = Field(50, gt=0, description="Checkpoint every N steps (resumable).")
    optim: str = Field("adamw_torch", description="transformers optimizer name, e.g. paged_adamw_8bit on GPU.")
    kernels: Literal["auto", "liger", "none"] = Field("auto", description="Fused Triton kernels from Liger (RMSNorm, SwiGLU, RoPE; for GPT-NeoX its RoPE). auto = liger on CUDA when installed and the architecture is supported. The loss never materialises the logits either way: TRL computes it in chunks.")
    padding_free: bool = Field(False, description="Pack a batch into one row without padding (needs flash attention on GPU).")
    fused_lora: bool = Field(True, description="One autograd function per LoRA linear (base GEMM + low-rank GEMM + dropout, hand-written backward) instead of PEFT's chain of separate ops: the same maths with less memory traffic. Layers it does not cover (DoRA, 8-bit bases) keep PEFT's forward.")
    frozen_dtype: Literal["auto", "compute", "float32"] = Field("auto", description="k-bit training: dtype of the frozen weights that are not quantized (norms, embeddings, LM head). float32 is PEFT's prepare_model_for_kbit_training, which also turns the residual stream float32 and so doubles what checkpointing keeps. auto = compute for bfloat16/float32 compute, float32 for float16 (whose range needs it).")
    offload_checkpoints: bool = Field(True, description="With gradient_checkpointing on CUDA: keep each layer's saved input in pinned host memory, copied on a side stream while the next layers compute.")
    offload_outputs: bool = Field(True, description="With offload_checkpoints and fused_lora, on GPT-NeoX: the attention projections' outputs (query_key_value, dense) from the first forward go to host memory too, and the recompute fetches them instead of running those GEMMs again (+6.6% tokens/s on a 7B). Pins layers x batch x seq x 4 x hidden x 2 B more host memory (8 GiB for a 7B at seq 2048, batch 4).")

    def upcast_frozen(self, spec: ModelSpec) -> bool:
        """Whether k-bit training casts the frozen unquantized weights to float32 (PEFT's
        preparation). Only float16 compute needs that (its range); bfloat16 has float32's."""
        compute = spec.compute_dtype if spec.quantization == "4bit" else spec.dtype
        return self.frozen_dtype == "float32" or (self.frozen_dtype == "auto" and compute == "float16")

    @model_validator(mode="after")
    def _accumulation(self) -> "SftSettings":
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of micro_batch_size {self.micro_batch_size}")
        return self


class MergeSettings(Strict):
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="Dtype the original base is loaded and merged in.")
    max_shard_size: str = Field("2GB")


class PpoSettings(Strict):
    reward: RewardSettings = Field(default_factory=RewardSettings)
    quantization: Literal["none", "8bit", "4bit"] = Field("none", description="Load the merged policy base quantized (the seed used 8bit).")
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings(r=16, alpha=32, dropout=0.05))
    steps: int = Field(20, gt=0, description="PPO steps (rollout + update each).")
    batch_size: int = Field(16, gt=0, description="Queries per PPO step.")
    mini_batch_size: int = Field(4, gt=0)
    ppo_epochs: int = Field(4, gt=0)
    learning_rate: float = Field(1.41e-5, gt=0)
    query_min_tokens: int = Field(2, gt=0)
    query_max_tokens: int = Field(8, gt=0)
    response_min_tokens: int = Field(4, gt=0)
    response_max_tokens: int = Field(16, gt=0)
    top_k: int = Field(0, ge=0, description="0 = no top-k filtering.")
    top_p: float = Field(1.0, gt=0, le=1)
    temperature: float = Field(1.0, gt=0)
    init_kl_coef: float = Field(0.2, ge=0)
    target_kl: float | None = Field(6.0, gt=0, description="Adaptive KL target; null = fixed coefficient.")
    kl_horizon: int = Field(10000, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    early_stop_kl: float | None = Field(None, gt=0, description="Stop a step's PPO epochs when approx KL exceeds this.")
    whiten_rewards: bool = Field(False)
    save_steps: int = Field(10, gt=0, description="Checkpoint every N PPO steps.")
    merge_adapter: bool = Field(False, description="Also save the policy merged into the base.")

    @model_validator(mode="after")
    def _ranges(self) -> "PpoSettings":
        if self.query_min_tokens > self.query_max_tokens:
            raise ValueError("query_min_tokens must be <= query_max_tokens")
        if self.response_min_tokens > self.response_max_tokens:
            raise ValueError("response_min_tokens must be <= response_max_tokens")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of mini_batch_size {self.mini_batch_size}")
        return self


class EvaluateSettings(Strict):
    max_rows: int = Field(64, gt=0, description="Held-out rows for loss and perplexity.")
    batch_size: int = Field(8, gt=0)
    max_seq_length: int = Field(512, gt=0)
    num_prompts: int = Field(4, ge=0, description="Held-out prompts answered before and after, side by side.")
    max_new_tokens: int = Field(48, gt=0)
    reward_prompts: int = Field(32, ge=0, description="RLHF pipelines: held-out queries scored for reward and KL.")


STAGE_SETTINGS: dict[str, type[Strict]] = {
    "env_check": EnvCheckSettings, "model_init": ModelInitSettings, "dataset": DatasetStageSettings,
    "sft": SftSettings, "merge": MergeSettings, "ppo": PpoSettings, "evaluate": EvaluateSettings,
}


class Stages(Strict):
    env_check: EnvCheckSettings | None = None
    model_init: ModelInitSettings | None = None
    dataset: DatasetStageSettings | None = None
    sft: SftSettings | None = None
    merge: MergeSettings | None = None
    ppo: PpoSettings | None = None
    evaluate: EvaluateSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, data: Any) -> Any:
        # `sft:` with nothing after it means "this stage, default settings".
        if isinstance(data, dict):
            order = [k for k in data if k in STAGE_ORDER]
            if order != sorted(order, key=STAGE_ORDER.index):
                raise ValueError(f"stages must run in the order {' -> '.join(STAGE_ORDER)}; got {' -> '.join(order)}")
            return {k: ({} if v is None else v) for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _dependencies(self) -> "Stages":
        present = self.names()
        needs = {"sft": ["model_init", "dataset"], "merge": ["sft"], "ppo": ["merge"],
                 "evaluate": ["model_init", "dataset"], "dataset": []}
        for stage, required in needs.items():
            for r in required:
                if stage in present and r not in present:
                    raise ValueError(f"stage '{stage}' needs stage '{r}' before it")
        if not present:
            raise ValueError("a pipeline needs at least one stage")
        return self

    def names(self) -> list[str]:
        return [s for s in STAGE_ORDER if getattr(self, s) is not None]


class Pipeline(Strict):
    name: str = Field("", description="Filled from the key under `pipelines:`.")
    description: str = ""
    seed: int = Field(42, description="Seeds data split, LoRA init, sampling.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    output_dir: str = Field("runs", description="Run folders go to <output_dir>/<pipeline>/<run_id>/.")
    model: ModelSpec
    dataset: DatasetSpec | None = None
    stages: Stages
    tracking: Tracking = Field(default_factory=Tracking)
    schedule: Schedule | None = None

    @model_validator(mode="after")
    def _dataset_present(self) -> "Pipeline":
        if self.stages.dataset is not None and self.dataset is None:
            raise ValueError("stage 'dataset' needs a top-level `dataset:` section")
        return self


class Config(Strict):
    pipelines: dict[str, Pipeline]


# ---------------------------------------------------------------- loading


def _format_validation(err: ValidationError, prefix: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in (prefix, *first["loc"]) if p != "")
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{loc}: {msg}{more}"


def parse_config(raw: Any, source: str = "pipelines.yaml") -> Config:
    """Validate the parsed YAML of a whole file."""
    if not isinstance(raw, dict) or "pipelines" not in raw:
        raise ConfigError(f"{source}: expected a mapping with a top-level `pipelines:` key")
    pipelines = raw["pipelines"]
    if not isinstance(pipelines, dict) or not pipelines:
        raise ConfigError(f"{source}: pipelines: expected a non-empty mapping of name -> pipeline")
    extra = [k for k in raw if k != "pipelines"]
    if extra:
        raise ConfigError(f"{source}: {extra[0]}: unknown key")
    parsed = {}
    for name, body in pipelines.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: pipelines.{name}: expected a mapping")
        try:
            parsed[name] = Pipeline.model_validate({**body, "name": str(name)})
        except ValidationError as e:
            raise ConfigError(f"{source}: {_format_validation(e, f'pipelines.{name}')}") from None
    return Config(pipelines=parsed)


def apply_overrides(body: dict, overrides: list[str] | dict[str, Any], source: str = "--set") -> dict:
    """Apply `a.b.c=value` overrides to one pipeline's raw mapping (values parsed as YAML scalars)."""
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    body = _deep_copy(body)
    for path, value in items:
        keys = path.split(".")
        if keys[0] == "stages" and len(keys) > 1 and keys[1] not in (body.get("stages") or {}):
            raise ConfigError(f"{source}: {path}: stage '{keys[1]}' is not in this pipeline")
        node = body
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {path}: '{k}' is not a section")
            node = child
        node[keys[-1]] = parse_scalar(value) if isinstance(value, str) else value
    return body


def _split_override(item: str) -> tuple[str, str]:
    path, sep, value = item.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"--set {item}: expected KEY.PATH=VALUE")
    return path.strip(), value


def _deep_copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deep_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deep_copy(v) for v in x]
    return x


def load_raw(path: str | Path) -> dict:
    try:
        return load_yaml(path)
    except YamlError as e:
        raise ConfigError(str(e)) from None


def load_config(path: str | Path = "pipelines.yaml") -> Config:
    return parse_config(load_raw(path), str(path))


def load_pipeline(path: str | Path, name: str, overrides: list[str] | dict | None = None) -> Pipeline:
    """One pipeline, with overrides applied, validated; the rest of the file must be valid too."""
    raw = load_raw(path)
    config = parse_config(raw, str(path))
    if name not in config.pipelines:
        known = ", ".join(config.pipelines)
        raise ConfigError(f"{path}: no pipeline named '{name}' (known: {known})")
    if not overrides:
        return config.pipelines[name]
    body = apply_overrides(raw["pipelines"][name], overrides)
    try:
        return Pipeline.model_validate({**body, "name": name})
    except ValidationError as e:
        raise ConfigError(f"--set: {_format_validation(e, f'pipelines.{name}')}") from None
