"""Stage sft: supervised fine-tuning of a LoRA adapter with TRL's SFTTrainer.

LoRA on the full-precision base, or QLoRA when the pipeline loads the base in
4-bit (bitsandbytes nf4 + double quant). Instruction data arrives as
prompt/completion pairs, so TRL computes the loss on the completion only.
Checkpoints go to a folder that outlives the run, keyed by the stage's inputs,
so a killed run started again with the same command resumes from the last one.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import torch

from tasks import checkpointing, fast_lora, kernels
from tasks.config import LoraSettings, ModelSpec, SftSettings
from tasks.data import DataResult, read_jsonl
from tasks.model import (ModelResult, OutOfMemory, guard_bnb_cpu, load_causal_lm, load_tokenizer, oom_message,
                          planned_peak_gib, resolve_device)
from tasks.rundir import StageResult, staged_dir, write_json


class TrainingDiverged(RuntimeError):
    """Loss became NaN or inf: stop before a broken adapter is merged anywhere."""


class SftResult(StageResult):
    adapter_path: str
    steps: int


def lora_config(lora: LoraSettings):
    from peft import LoraConfig
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, bias="none", task_type="CAUSAL_LM")


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


def _complete(ckpt: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint without a readable one was cut off mid-save."""
    import json
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any(ckpt.glob("adapter_model.safetensors")) or any(ckpt.glob("model*.safetensors"))


def last_checkpoint(folder: Path) -> tuple[str | None, int | None]:
    """The newest *complete* checkpoint-N under folder (a kill during a save leaves a partial newest one)."""
    if not folder.is_dir():
        return None, None
    found = [(int(p.name.rsplit("-", 1)[1]), p) for p in folder.glob("checkpoint-*")
             if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit() and _complete(p)]
    if not found:
        return None, None
    step, path = max(found)
    return str(path), step


def build_trainer(settings: SftSettings, spec: ModelSpec, model_res: ModelResult, data: DataResult,
                  device: str, checkpoint_dir: Path, seed: int):
    from datasets import Dataset
    from peft import get_peft_model, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    from transformers import set_seed
    set_seed(seed)   # LoRA's A matrices are drawn below, before the Trainer seeds anything: same seed, same adapter
    tok = load_tokenizer(model_res.tokenizer_path, spec.trust_remote_code)
    model = load_causal_lm(model_res.model_path, spec, device)
    if spec.quantization != "none" and settings.upcast_frozen(spec):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora_config(settings.lora))   # freezes the base; LoRA weights in fp32
    if device == "cpu":
        guard_bnb_cpu(model)
    if settings.fused_lora:
        fast_lora.fuse_lora_layers(model)
    # our own checkpointing (offload, skipped recompute of residual outputs) replaces transformers':
    # the Trainer must then not install its own over it
    own_checkpointing = settings.gradient_checkpointing and (settings.fused_lora or settings.offload_checkpoints)
    if own_checkpointing:
        checkpointing.enable(model, offload=settings.offload_checkpoints and device == "cuda")
        if settings.fused_lora:
            fast_lora.mark_residual_outputs(model)
            if settings.offload_outputs:   # takes effect only where the checkpoints are offloaded (CUDA)
                fast_lora.mark_cached_outputs(model)
    bf16 = device == "cuda" and spec.dtype in ("auto", "bfloat16")
    liger = kernels.use_liger(settings.kernels, device, model)
    args = SFTConfig(
        output_dir=str(checkpoint_dir), seed=seed, data_seed=seed,
        per_device_train_batch_size=settings.micro_batch_size,
        gradient_accumulation_steps=settings.batch_size // settings.micro_batch_size,
        learning_rate=settings.learning_rate, num_train_epochs=settings.epochs, max_steps=settings.max_steps,
        lr_scheduler_type=settings.lr_scheduler, warmup_steps=settings.warmup_ratio,
        weight_decay=settings.weight_decay, optim=settings.optim, max_length=settings.max_seq_length,
        completion_only_loss=settings.completion_only_loss if data.format == "instruction" else None,
        gradient_checkpointing=settings.gradient_checkpointing and not own_checkpointing,
        # non-reentrant checkpointing and no unused-parameter search: what DDP needs with a frozen base
        gradient_checkpointing_kwargs={"use_reentrant": False}, ddp_find_unused_parameters=False,
        logging_steps=settings.logging_steps, save_steps=settings.save_steps, save_total_limit=2,
        report_to="none", use_cpu=device == "cpu", bf16=bf16, fp16=False,
        dataloader_num_workers=0, disable_tqdm=False, use_liger_kernel=liger,
        padding_free=settings.padding_free,
    )
    train = Dataset.from_list(read_jsonl(data.train_path))
    return SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok,
                      callbacks=[finite_loss_callback()])


def run(settings: SftSettings, spec: ModelSpec, model_res: ModelResult, data: DataResult,
        out_dir: str | Path, *, device: str = "auto", seed: int = 42,
        checkpoint_dir: str | Path | None = None) -> SftResult:
    t0 = time.time()
    device = resolve_device(device)
    out = Path(out_dir)
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else out.with_name(f".{out.name}.checkpoints")
    with checkpoint_lock(ckpt_root) as (ckpt_root, owned):
        result = _train(settings, spec, model_res, data, out, device, seed, ckpt_root, t0)
        if owned:  # the adapter is in the stage folder (and cached): the checkpoints have done their job
            shutil.rmtree(ckpt_root, ignore_errors=True)
    return result


@contextlib.contextmanager
def checkpoint_lock(root: Path) -> Iterator[tuple[Path, bool]]:
    """One process at a time trains into a checkpoint folder. A second run of the same inputs
    started while the first is still training gets a private folder (removed afterwards)
    instead of resuming from, or rotating away, the other's checkpoints. The lock dies with
    its process, so a killed run never blocks the rerun that resumes it."""
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no protection, as before
        yield root, True
        return
    with open(root.parent / f"{root.name}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            private = root.with_name(f"{root.name}.concurrent-{os.getpid()}")
            try:
                yield private, False
            finally:
                shutil.rmtree(private, ignore_errors=True)
            return
        try:
            yield root, True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _train(settings: SftSettings, spec: ModelSpec, model_res: ModelResult, data: DataResult, out: Path,
           device: str, seed: int, ckpt_root: Path, t0: float) -> SftResult:
    resume, resumed_step = last_checkpoint(ckpt_root)
    try:
        trainer = build_trainer(settings, spec, model_res, data, device, ckpt_root, seed)
        output = trainer.train(resume_from_checkpoint=resume)
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemory(oom_message("sft", settings, planned_peak_gib(out, "sft"))) from None
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
