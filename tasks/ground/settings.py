"""Pipeline-wide settings of pipelines.yaml, and the pieces several stages share.

pydantic classes whose keys are 1:1 with the YAML. Each stage's own settings class
lives in its stage module; tasks/registry.py assembles `stages:` from them. This
module imports no runtime code: `shomin validate` and the JSON schema need nothing
heavier than pydantic.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EMBEDDED_PREFIX = "embedded:"
DEFAULT_CLASSIFIER = "lvwerra/distilbert-imdb"
CLASSIFIER_ONLY = frozenset({"model", "positive_label", "output", "batch_size", "trust_remote_code"})


def changed(model: BaseModel, field: str) -> bool:
    """Whether a field holds something other than its default (a setting someone meant)."""
    info = type(model).model_fields[field]
    return getattr(model, field) != info.get_default(call_default_factory=True)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- pipeline-wide


class ModelSpec(Strict):
    source: str = Field(description="Hub id (org/name), a local folder, or embedded:smollm2-135m-instruct.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    quantization: Literal["none", "8bit", "4bit"] = Field("none", description="Load the base weights quantized with bitsandbytes.")
    int8_matmul: Literal["weight_only", "llm_int8"] = Field("weight_only", description="How 8-bit layers compute. weight_only: the stored int8 weights times 16-bit activations (on CUDA one Triton GEMM that dequantizes in registers, elsewhere in chunks of rows; nothing of the input kept for the backward; faster, and closer to the 16-bit model). llm_int8: bitsandbytes' LLM.int8() with its outlier threshold, as seed 003 ran.")
    int4_matmul: Literal["bitsandbytes", "sliced", "triton"] = Field("bitsandbytes", description="How frozen 4-bit layers compute. bitsandbytes: its own Linear4bit, which mostly dequantizes the whole weight to 16 bits per call (302 MB for one 20B MLP matrix) and is the faster; a decode step's few rows go through its fused 4-bit GEMM for every shape (no copy). sliced: the least memory, no whole 16-bit copy ever exists: up to 16 rows (a rollout's decode step) on CUDA bitsandbytes' fused 4-bit GEMM for every shape, otherwise the weight dequantized 32 MiB of rows at a time, each slice consumed by a GEMM before the next is made; nothing of the input kept for the backward. On a 4-bit 20B PPO policy with gradient checkpointing: 0.61 GiB over the weights against 0.86, at 4.99 s a step against 3.79 (README, Benchmarks). triton: as sliced, but up to 256 rows Triton GEMMs decode each tile of the 4-bit weight in registers (levers/int4_kernel.py; measured on Hopper) where CUDA and Triton are; elsewhere the slices. On the 20B shapes faster than bitsandbytes' layer at 16 and 96 rows; on the 20B PPO policy with checkpointing 0.59 GiB over the weights at 3.33 s a step (README, Benchmarks).")
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
    format: Literal["instruction", "text", "chat", "preference"] = Field("instruction", description="instruction: instruction/input/output columns; text: one text column; chat: conversations (a `messages` column of role/content, ShareGPT `conversations` of from/value, or instruction rows as one turn) rendered with the model's chat template, the loss on every assistant turn; preference: pairs of a `prompt` and a `chosen` and a `rejected` answer (strings, or role/content message lists), for reward_model, dpo and SFT on the chosen answers.")
    text_column: str = Field("text", description="Column holding the text (format: text).")
    split: str = Field("train", description="Hub split to read.")
    template: Template = Field(default_factory=Template)
    system: str | None = Field(None, description="format chat: a system prompt put first in every conversation that has none of its own.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of rows held out for evaluation.")
    eval_max_rows: int | None = Field(None, gt=0, description="Cap on held-out rows.")
    max_rows: int | None = Field(None, gt=0, description="Use only this many rows (after a seeded shuffle).")
    allow_extra_columns: bool = Field(False, description="Ignore columns beyond the ones the format needs (hub sets often carry ids, categories).")

    @model_validator(mode="after")
    def _used_by_the_format(self) -> "DatasetSpec":
        # a setting the chosen format never reads would silently do nothing
        unused = {"instruction": ("text_column", "system"), "text": ("template", "system"),
                  "chat": ("text_column", "template"),
                  "preference": ("text_column", "template", "system")}[self.format]
        for name in unused:
            if changed(self, name):
                raise ValueError(f"`{name}` is not used with format {self.format!r}; remove it or change `format`")
        return self


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


class LoraSettings(Strict):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field("all-linear", description="Modules to adapt; 'all-linear' or names like [q_proj, v_proj].")


class RewardSettings(Strict):
    """How generated text is scored during PPO."""

    kind: Literal["vader", "hf-classifier", "function", "trained"] = Field(
        default="vader",
        description=(
            "Which reward to use: 'vader' (VADER compound sentiment in [-1, 1], no model needed), "
            "'hf-classifier' (a Hugging Face sequence-classification model), "
            "'function' (your own Python function, see `function`), or "
            "'trained' (the reward model the pipeline's own reward_model stage trained)."
        ),
    )
    model: str | None = Field(
        default=None,
        description=(
            "hf-classifier only: Hugging Face hub id or local folder of a sequence-classification "
            f"model. Defaults to '{DEFAULT_CLASSIFIER}' when kind is 'hf-classifier'."
        ),
    )
    positive_label: str = Field(
        default="POSITIVE",
        description=(
            "hf-classifier only: NAME of the label to reward, looked up case-insensitively in "
            "the model's config.id2label (never an index)."
        ),
    )
    output: Literal["logit", "probability"] = Field(
        default="logit",
        description=(
            "hf-classifier only: reward with the raw logit of the positive label ('logit') "
            "or its softmax probability in (0, 1) ('probability')."
        ),
    )
    function: str | None = Field(
        default=None,
        description=(
            "function only (and required there): 'package.module:function', an importable "
            "callable taking list[str] and returning one finite float per text."
        ),
    )
    batch_size: int = Field(
        default=16,
        gt=0,
        description="hf-classifier only: number of texts scored per forward pass.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description=(
            "hf-classifier only: allow custom model code shipped with the model to run. "
            "Enable only for models you trust."
        ),
    )

    @model_validator(mode="after")
    def _check_kind_fields(self) -> RewardSettings:
        if self.kind == "function":
            if not self.function:
                raise ValueError(
                    "kind 'function' requires `function` set to 'package.module:function'"
                )
        elif self.function is not None:
            raise ValueError(
                f"`function` is only used with kind 'function', but kind is {self.kind!r}; "
                "remove `function` or set kind: function"
            )
        ignored = [] if self.kind == "hf-classifier" else sorted(f for f in CLASSIFIER_ONLY if changed(self, f))
        if ignored:
            raise ValueError(f"`{ignored[0]}` is only used with kind 'hf-classifier', but kind is {self.kind!r}; "
                             f"remove it or set kind: hf-classifier")
        if self.kind == "hf-classifier" and self.model is None:
            self.model = DEFAULT_CLASSIFIER
        return self


class StagesBase(Strict):
    """`stages:` of a pipeline. The fields are the registered stages (tasks/registry.py);
    `ORDER` and `NEEDS` come from the same registry."""
    ORDER: ClassVar[tuple[str, ...]] = ()
    NEEDS: ClassVar[dict[str, tuple[str, ...]]] = {}
    NEEDS_DATASET: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, data: Any) -> Any:
        # `sft:` with nothing after it means "this stage, default settings".
        if isinstance(data, dict):
            order = [k for k in data if k in cls.ORDER]
            if order != sorted(order, key=cls.ORDER.index):
                raise ValueError(f"stages must run in the order {' -> '.join(cls.ORDER)}; got {' -> '.join(order)}")
            return {k: ({} if v is None else v) for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _dependencies(self) -> "StagesBase":
        present = self.names()
        if not present:
            raise ValueError("a pipeline needs at least one stage")
        for stage in present:
            for needed in self.NEEDS.get(stage, ()):
                if needed not in present:
                    raise ValueError(f"stage '{stage}' needs stage '{needed}' before it")
        return self

    def names(self) -> list[str]:
        return [s for s in self.ORDER if getattr(self, s, None) is not None]


class PipelineBase(Strict):
    """One pipeline; tasks/registry.py adds the typed `stages` field."""
    name: str = Field("", description="Filled from the key under `pipelines:`.")
    description: str = ""
    seed: int = Field(42, description="Seeds data split, LoRA init, sampling.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    device_memory_gib: float | None = Field(
        None, gt=0, description="Hold the run to this much memory of the device it trains on (GiB), as if the "
                                "card were that size: the memory plan and env_check check against it, and on CUDA "
                                "torch is capped to it. For a shared GPU, or to plan for a smaller card (a 24 GB "
                                "card has about 22.4 GiB usable). null = the device's free memory.")
    output_dir: str = Field("runs", description="Run folders go to <output_dir>/<pipeline>/<run_id>/.")
    model: ModelSpec
    dataset: DatasetSpec | None = None
    stages: StagesBase
    tracking: Tracking = Field(default_factory=Tracking)
    schedule: Schedule | None = None

    @model_validator(mode="after")
    def _dataset_present(self) -> "PipelineBase":
        needing = [s for s in self.stages.names() if s in type(self.stages).NEEDS_DATASET]
        if needing and self.dataset is None:
            raise ValueError(f"stage '{needing[0]}' needs a top-level `dataset:` section")
        return self


