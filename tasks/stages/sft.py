"""Stage sft: supervised fine-tuning of a LoRA adapter with TRL's SFTTrainer.

LoRA on the full-precision base, or QLoRA when the pipeline loads the base in
4-bit (bitsandbytes nf4 + double quant). Instruction data arrives as
prompt/completion pairs, so TRL computes the loss on the completion only; chat data as
token ids with the assistant turns marked (tasks/models/chat.py), the loss on those.
Checkpoints go to a folder that outlives the run, keyed by the stage's inputs,
so a killed run started again with the same command resumes from the last one.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from shomin.tasks.ground import checkpoints as store
from shomin.tasks.ground.contract import Inputs, Stage, StageContext
from shomin.tasks.ground.errors import ConfigError, TrainingDiverged, is_disk_full
from shomin.tasks.ground.progress import progress
from shomin.tasks.ground.records import DataResult, ModelResult, SftResult
from shomin.tasks.ground.rundir import read_jsonl, staged_dir, write_json
from shomin.tasks.ground.settings import EMBEDDED_PREFIX, LoraSettings, ModelSpec, Strict
from shomin.tasks.models import levers as speed
from shomin.tasks.models import memory as mem
from shomin.tasks.models.chat import encode, require_template
from shomin.tasks.models.levers import padding_free
from shomin.tasks.models.loading import guard_bnb_cpu, load_causal_lm, load_tokenizer, lora_config
from shomin.tasks.models.preference_eval import chosen_row


class SftSettings(Strict):
    lora: LoraSettings = Field(default_factory=LoraSettings)
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training set.")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps; -1 = run the epochs.")
    batch_size: int = Field(8, gt=0, description="Effective batch (rows per optimizer step).")
    micro_batch_size: int = Field(4, gt=0, description="Rows per forward pass; batch_size / micro_batch_size steps are accumulated.")
    max_seq_length: int = Field(512, gt=0, description="Tokens per row; longer rows are truncated.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the optimizer steps spent warming the learning rate up linearly.")
    lr_scheduler: str = Field("linear", description="transformers scheduler name.")
    weight_decay: float = Field(0.0, ge=0)
    completion_only_loss: bool = Field(True, description="Instruction format: loss on the response only.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    logging_steps: int = Field(5, gt=0)
    save_steps: int = Field(50, gt=0, description="Checkpoint every N steps (resumable).")
    optim: str = Field("adamw_torch", description="transformers optimizer name, e.g. paged_adamw_8bit on GPU.")
    kernels: Literal["auto", "liger", "none"] = Field("auto", description="Fused Triton kernels from Liger (RMSNorm, SwiGLU, RoPE; for GPT-NeoX its RoPE). auto = liger on CUDA when installed and the architecture is supported. The loss never materialises the logits either way: TRL computes it in chunks.")
    padding_free: bool | Literal["auto"] = Field("auto", description="Lay each micro-batch's rows end to end in one row with no padding, positions restarting per row and attention kept inside each row (exact: the same rows per step, only the pad tokens go). On CUDA attention runs PyTorch's variable-length flash kernel over the row boundaries; elsewhere SDPA with a block-diagonal mask, whose cost grows with the whole micro-batch's length squared. auto = on for CUDA where that kernel exists and the architecture is one the tests check (llama, mistral, qwen2, qwen3, gpt_neox).")
    fused_lora: bool = Field(True, description="One autograd function per LoRA linear (base GEMM + low-rank GEMM + dropout, hand-written backward) instead of PEFT's chain of separate ops: the same maths with less memory traffic. Layers it does not cover (DoRA, 8-bit bases) keep PEFT's forward.")
    frozen_dtype: Literal["auto", "compute", "float32"] = Field("auto", description="k-bit training: dtype of the frozen weights that are not quantized (norms, embeddings, LM head). float32 is PEFT's prepare_model_for_kbit_training, which also turns the residual stream float32 and so doubles what checkpointing keeps. auto = compute for bfloat16/float32 compute, float32 for float16 (whose range needs it).")
    offload_checkpoints: bool = Field(True, description="With gradient_checkpointing on CUDA: keep each layer's saved input in pinned host memory, copied on a side stream while the next layers compute.")
    mlp_chunk_tokens: int = Field(8192, ge=0, description="Run each layer's MLP over a micro-batch's tokens in chunks of this many, its backward recomputing one chunk at a time (exact: the MLP is token-wise; dropout masks are replayed), so its intermediate activations never exist for all tokens at once: what long context runs out of first. Micro-batches of up to this many tokens are not touched; 0 = never chunk.")
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


def finite_loss_callback():
    from transformers import TrainerCallback

    class StopOnNonFinite(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "train_loss", "grad_norm"):
                v = (logs or {}).get(key)
                if v is not None and not math.isfinite(v):
                    raise TrainingDiverged(f"sft: {key} became {v} at step {state.global_step}; "
                                           "lower learning_rate or check the data")
    return StopOnNonFinite()


def progress_callback():
    """Reports each logged step (loss, learning rate, tokens/s) to whoever watches the stage."""
    from transformers import TrainerCallback

    class Reporting(TrainerCallback):   # under `accelerate launch` only the first process reports
        report = None

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            self.report = progress("sft", f"sft: training to step {state.max_steps}", state.max_steps,
                                   first_step=state.global_step)
            self.tokens0 = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            metrics = dict(logs or {})
            if self.report is None or "loss" not in metrics:   # the closing summary is not a step
                return
            tokens = metrics.get("num_tokens")
            if tokens is not None:   # tokens/s over the steps this process has run
                self.tokens0 = tokens if self.tokens0 is None else self.tokens0
                seconds = time.time() - self.report.t0
                metrics["tokens_per_s"] = (tokens - self.tokens0) / seconds if seconds > 0 else 0.0
            self.report.update(state.global_step, metrics)

        def on_train_end(self, args, state, control, **kwargs):
            if self.report is None:
                return
            losses = [e["loss"] for e in state.log_history if "loss" in e]
            self.report.done(f"{state.global_step} steps" + (f", last loss {losses[-1]:.4f}" if losses else ""))
    return Reporting()


def last_checkpoint(folder: Path) -> tuple[str | None, int | None]:
    """The newest *complete* checkpoint-N under folder (a kill during a save leaves a partial newest one)."""
    path, step = store.latest(folder, "checkpoint", store.trainer_complete)
    return (str(path) if path else None), step


def chat_rows(tok, rows: list[dict], max_len: int) -> list[dict]:
    """Conversations as token ids plus TRL's `assistant_masks`, from which it builds the labels:
    the loss covers every assistant turn and nothing else. A row whose assistant tokens all
    fall past max_seq_length would train on nothing and is left out."""
    require_template(tok, "stages.sft")
    encoded = [encode(tok, r["messages"], max_len, f"train row {n}: ") for n, r in enumerate(rows, 1)]
    kept = [{"input_ids": ids, "assistant_masks": mask} for ids, mask in encoded if any(mask)]
    if not kept:
        raise ConfigError(f"stages.sft.max_seq_length: {max_len} tokens cut off every assistant turn; raise it")
    return kept


def use_padding_free(settings: SftSettings, model, device: str) -> bool:
    """The `padding_free` setting resolved for this model and device (see its help)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if settings.padding_free is True and not padding_free.exact(base):
        raise ConfigError(f"stages.sft.padding_free: {base.config.model_type} is not one of "
                          f"{sorted(padding_free.PACKABLE)}, whose rows are known to stay apart without padding")
    if settings.padding_free == "auto":
        return padding_free.exact(base) and device == "cuda" and padding_free.varlen_kernel() is not None
    return bool(settings.padding_free)


def build_trainer(settings: SftSettings, spec: ModelSpec, model_res: ModelResult, data: DataResult,
                  device: str, checkpoint_dir: Path, seed: int):
    """The TRL SFTTrainer with the speed levers applied; returns (trainer, levers). The caller
    calls `levers.restore()` when done: Liger's patches are process-wide."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(seed)   # LoRA's A matrices are drawn below, before the Trainer seeds anything: same seed, same adapter
    tok = load_tokenizer(model_res.tokenizer_path, spec.trust_remote_code)
    model = load_causal_lm(model_res.model_path, spec, device)

    def add_adapter(m):
        m = get_peft_model(m, lora_config(settings.lora))   # freezes the base; LoRA weights in fp32
        if device == "cpu":
            guard_bnb_cpu(m)
        return m
    model, levers = speed.apply(model, settings, device, quantized=spec.quantization != "none",
                                upcast=settings.upcast_frozen(spec), add_adapter=add_adapter)
    bf16 = device == "cuda" and spec.dtype in ("auto", "bfloat16")
    batches = settings.batch_size // settings.micro_batch_size
    args = SFTConfig(
        output_dir=str(checkpoint_dir), seed=seed, data_seed=seed,
        per_device_train_batch_size=settings.micro_batch_size, gradient_accumulation_steps=batches,
        learning_rate=settings.learning_rate, num_train_epochs=settings.epochs, max_steps=settings.max_steps,
        # transformers 5 reads a warmup_steps below 1 as a share of the steps (its warmup_ratio is
        # deprecated); pyproject requires transformers >= 5 for exactly this
        lr_scheduler_type=settings.lr_scheduler, warmup_steps=settings.warmup_ratio,
        weight_decay=settings.weight_decay, optim=settings.optim, max_length=settings.max_seq_length,
        completion_only_loss=settings.completion_only_loss if data.format in ("instruction", "preference") else None,
        gradient_checkpointing=settings.gradient_checkpointing and not levers.own_checkpointing,
        # non-reentrant checkpointing and no unused-parameter search: what DDP needs with a frozen base
        gradient_checkpointing_kwargs={"use_reentrant": False}, ddp_find_unused_parameters=False,
        logging_steps=settings.logging_steps, save_steps=settings.save_steps, save_total_limit=2,
        report_to="none", use_cpu=device == "cpu", bf16=bf16, fp16=False,
        dataloader_num_workers=0, disable_tqdm=False, use_liger_kernel=levers.trainer_liger,
    )
    rows = read_jsonl(data.train_path)
    if data.format == "preference":   # SFT on preference pairs: the chosen answers, the loss on them only
        rows = [chosen_row(r) for r in rows]
    chat = data.format == "chat" or (data.format == "preference" and "messages" in rows[0])
    train = Dataset.from_list(chat_rows(tok, rows, settings.max_seq_length) if chat else rows)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok,
                         callbacks=[finite_loss_callback(), progress_callback()])
    trainer.add_callback(speed.after_trainer(settings))
    if use_padding_free(settings, model, device):   # TRL has truncated the rows; its collator then drops the padding
        trainer.data_collator = padding_free.collator(tok)
        padding_free.prepare(model.get_base_model(), device)
    return trainer, levers


def run(ctx: StageContext, inputs: Inputs) -> SftResult:
    """Trains into ctx.checkpoint_dir (the registry holds its lock) and resumes from its newest
    complete checkpoint; the adapter goes to the stage folder."""
    t0, settings, spec, out = time.time(), ctx.settings, ctx.model, Path(ctx.out_dir)
    ckpt_root = ctx.checkpoints()
    resume, resumed_step = last_checkpoint(ckpt_root)
    trainer, levers = build_trainer(settings, spec, inputs["model_init"], inputs["dataset"], ctx.device,
                                    ckpt_root, ctx.seed)
    try:
        output = trainer.train(resume_from_checkpoint=resume)
    except Exception as e:
        if is_disk_full(e):   # the Trainer's checkpoint-N cut off mid-save must not look like a resume point
            store.prune_incomplete(ckpt_root, "checkpoint", store.trainer_complete)
        raise
    finally:
        levers.restore()
    if not math.isfinite(output.training_loss):
        raise TrainingDiverged(f"sft: training loss is {output.training_loss}; lower learning_rate or check the data")
    with staged_dir(out) as tmp:
        trainer.model.save_pretrained(tmp / "adapter", safe_serialization=True)
        trainer.processing_class.save_pretrained(tmp / "adapter")
        write_json(tmp / "log_history.json", trainer.state.log_history)
    steps = trainer.state.global_step
    metrics = {"train_loss": float(output.training_loss), "steps": float(steps),
               "train_runtime_s": float(output.metrics.get("train_runtime", 0.0))}
    return SftResult(stage="sft", output_dir=str(out), adapter_path=str(out / "adapter"), steps=steps,
                     metrics=metrics, artifacts={"adapter": str(out / "adapter"),
                                                 "log_history": str(out / "log_history.json")},
                     seconds=time.time() - t0, resumed_from_step=resumed_step)


def check(pipeline, settings: SftSettings, before_run: bool) -> None:
    if pipeline.dataset is not None and pipeline.dataset.format == "chat":
        _check_chat_template(pipeline.model, before_run)
    if settings.kernels == "liger":
        import torch
        from shomin.tasks.models.levers import kernels
        if pipeline.device == "cpu" or not torch.cuda.is_available() or not kernels.available():
            raise ConfigError("stages.sft.kernels: liger needs CUDA and `pip install liger-kernel`; use auto or none")


def _check_chat_template(spec: ModelSpec, before_run: bool) -> None:
    """A model without a chat template is refused before anything loads: a local folder is read,
    a hub model's tokenizer files are fetched (they are small) just before a run; the embedded
    model has one."""
    from shomin.tasks.ground import hub
    if spec.source.startswith(EMBEDDED_PREFIX) or (hub.is_hub_id(spec.source) and not before_run):
        return
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(spec.source, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except Exception:   # not downloadable now: model_init will say why, and the stage checks again
        return
    require_template(tok, f"model.source {spec.source}")


def plan(sft: "SftSettings", inputs: mem.PlanInputs) -> dict:
    """See the module docstring; the SFT levers change these terms. frozen_dtype float32 (PEFT's
    k-bit preparation) stores the unquantized weights and the checkpointed residual stream in
    4 B; offload_checkpoints keeps the checkpoints in host memory; fused_lora under the
    stage's own checkpointing keeps one layer's dequantized weights through its backward, and
    no dropped-out input copies; mlp_chunk_tokens holds the MLP's activations to one chunk."""
    spec, shape, device, weights, act_b, notes = (inputs.spec, inputs.shape, inputs.device, inputs.weights,
                                                  inputs.act_bytes, inputs.notes)
    b, s, n_lora, layers = sft.micro_batch_size, sft.max_seq_length, mem.lora_params(shape, sft.lora), shape["num_hidden_layers"]
    ckpt = sft.gradient_checkpointing
    upcast = spec.quantization != "none" and sft.upcast_frozen(spec)
    if upcast:
        weights += (shape["num_parameters"] - shape["linear_params"]) * (4 - act_b)
    offload = ckpt and sft.offload_checkpoints and device == "cuda"
    resid_b = 4 if upcast else act_b
    own_ckpt = ckpt and (sft.fused_lora or sft.offload_checkpoints)
    fused = sft.fused_lora and spec.quantization != "8bit"   # 8-bit bases keep PEFT's forward (levers/fast_lora.py)
    layer_weights = act_b * shape["linear_params"] // layers if own_ckpt and fused else 0
    notes["sft.weights"] = f"{spec.quantization}: model.quantization"
    terms = {"weights": weights, "lora": 8 * n_lora, "optimizer": 8 * n_lora,
             "checkpoints": 0 if offload or not ckpt else layers * resid_b * s * b * shape["hidden_size"],
             "activations": mem.activations(b, s, shape, act_b, ckpt, with_inputs=False, mlp_chunk=sft.mlp_chunk_tokens)
             # fused LoRA keeps its input and redraws the dropout mask: no dropped copies
             + (0 if fused else mem.lora_dropout(b, s, shape, sft.lora, act_b, ckpt)) + layer_weights
             + (round(mem.K_BWD * act_b / 2 * s * b * shape["hidden_size"]) if ckpt else 0),
             "logits": mem.logits(b, s, shape, dtype_bytes=act_b, chunked=mem.chunked_lm_head())}
    # under checkpointing the LM head's backward and the layers' recompute come one after the other
    transient = max(terms["activations"], terms["logits"]) if ckpt else terms["activations"] + terms["logits"]
    terms["total"] = weights + 16 * n_lora + terms["checkpoints"] + transient
    notes["sft.lora"] = f"{n_lora:,} params x (4 B weight + 4 B grad)"
    notes["sft.activations"] = (f"b={b} s={s} checkpointing={ckpt}" + (", checkpoints offloaded" if offload else "")
                                + (", frozen weights float32" if upcast else ""))
    notes["sft.total"] = "weights + lora + optimizer + checkpoints + " + \
        ("max(activations, logits)" if ckpt else "activations + logits")
    return terms


STAGE = Stage("sft", SftSettings, run, plan=plan, check=check, needs=("model_init", "dataset"), checkpoints=True,
              lower=("micro_batch_size", "max_seq_length"),
              advice="set model.quantization: 4bit, or turn on stages.sft.gradient_checkpointing",
              help="Supervised fine-tuning of a LoRA adapter (QLoRA on a 4-bit base) with TRL's SFTTrainer.")
