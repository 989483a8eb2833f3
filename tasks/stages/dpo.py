"""Stage dpo: Direct Preference Optimization of a LoRA on the merged SFT model (TRL's DPOTrainer).

DPO (Rafailov et al., 2023) trains the policy straight from preference pairs, with no reward
model and no sampling: the loss pushes up the implicit reward
r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) of the chosen answer over the rejected one.

One copy of the weights: the policy is a fresh LoRA on the merged SFT model and the
reference is that same model with the adapter disabled. TRL does exactly this when it is
given a `peft_config` and no `ref_model` (`DPOTrainer.__init__` keeps `ref_model = None`,
and `_compute_loss` / `compute_ref_log_probs` run the reference forward under
`use_adapter(model, None)`, i.e. `model.disable_adapter()`). LoRA's B starts at 0, so
before the first update the policy *is* the reference: every implicit reward is 0 and
`accuracy_before` (reward of chosen strictly above rejected) is 0 by construction;
`logp_accuracy_before` says how often the SFT model already ranked the chosen answer higher.

The held-out pairs are measured before and after training twice over: TRL's own evaluation
(`eval_loss`, its batch-averaged rewards) and a per-pair pass through the same model and
reference, from which come the means and their standard errors (tasks/models/stats.py).
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
from shomin.tasks.ground.preferences import COLUMNS, require_preference_data
from shomin.tasks.ground.progress import progress
from shomin.tasks.ground.records import DataResult, TunedPolicyResult
from shomin.tasks.ground.rundir import read_jsonl, staged_dir, write_json
from shomin.tasks.ground.settings import LoraSettings, ModelSpec, Strict
from shomin.tasks.models import stats
from shomin.tasks.models.loading import load_causal_lm, load_tokenizer, lora_config


class DpoSettings(Strict):
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings(r=16, alpha=32, dropout=0.05),
                               description="The policy's LoRA on the merged SFT model. Its dropout acts on the LoRA "
                                           "input only; the base model's own dropout is turned off so the reference "
                                           "(adapter disabled) is deterministic.")
    beta: float = Field(0.1, gt=0, description="Strength of the tie to the reference: higher keeps the policy closer "
                                               "(for ipo, the regularisation tau).")
    loss_type: Literal["sigmoid", "hinge", "ipo", "bco_pair", "apo_zero"] = Field(
        "sigmoid", description="TRL's DPO loss: sigmoid = the paper's; hinge (SLiC), ipo (IPO, length-normalised), "
                               "bco_pair (BCO), apo_zero (APO, when the chosen answers beat the model's own).")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate of the LoRA weights.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs.")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps; -1 = run the epochs.")
    batch_size: int = Field(8, gt=0, description="Effective batch (pairs per optimizer step).")
    micro_batch_size: int = Field(4, gt=0, description="Pairs per forward pass; batch_size / micro_batch_size steps "
                                                       "are accumulated.")
    max_length: int = Field(512, gt=0, description="Tokens of prompt + answer; longer pairs are truncated at the end, "
                                                   "pairs whose prompt alone fills it are dropped.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    logging_steps: int = Field(5, gt=0, description="Log loss and rewards every N steps.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N steps (resumable).")
    quantization: Literal["none", "4bit"] = Field("none", description="Load the merged base in 4-bit (QLoRA, "
                                                                      "bitsandbytes nf4 as model.* says).")

    @model_validator(mode="after")
    def _accumulation(self) -> "DpoSettings":
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of micro_batch_size {self.micro_batch_size}")
        return self


def preference_rows(path: str, tok, where: str) -> list[dict]:
    """The pairs as the dataset stage wrote them (tasks/ground/preferences.py), only the three columns
    TRL should read (it would take extras such as `tools` for its own). Conversational pairs are rendered with the model's chat template, so it must have one."""
    rows = [{k: r[k] for k in COLUMNS} for r in read_jsonl(path)]
    if not rows:
        raise ConfigError(f"{where}: no preference pairs; dpo needs training and held-out pairs")
    if isinstance(rows[0]["prompt"], list) and not getattr(tok, "chat_template", None):
        raise ConfigError(f"{where}: conversational pairs need the model's chat template and the merged model's "
                          "tokenizer has none; use a chat model or string prompt/chosen/rejected")
    return rows


def load_policy_base(settings: DpoSettings, spec: ModelSpec, merged_path: str, device: str):
    """The merged SFT model, without dropout of its own: the reference forward runs in train mode
    during training and must give the same numbers every time. TRL's `disable_dropout` would also
    zero the LoRA dropout the settings ask for, so it is done here, before the adapter exists."""
    from peft import prepare_model_for_kbit_training
    from trl.trainer.utils import disable_dropout_in_model
    model = load_causal_lm(merged_path, spec, device, quantization=settings.quantization)
    if settings.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    disable_dropout_in_model(model)
    return model


def build_trainer(settings: DpoSettings, spec: ModelSpec, merged_path: str, data: DataResult, device: str,
                  checkpoint_dir: Path, seed: int, callbacks: list | None = None):
    """DPOTrainer with a fresh LoRA (`peft_config`) and `ref_model=None`: one copy of the weights."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = load_tokenizer(merged_path, spec.trust_remote_code)
    model = load_policy_base(settings, spec, merged_path, device)
    batches = settings.batch_size // settings.micro_batch_size
    args = DPOConfig(
        output_dir=str(checkpoint_dir), seed=seed, data_seed=seed, beta=settings.beta, loss_type=[settings.loss_type],
        per_device_train_batch_size=settings.micro_batch_size, per_device_eval_batch_size=settings.micro_batch_size,
        gradient_accumulation_steps=batches, learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs, max_steps=settings.max_steps, max_length=settings.max_length,
        gradient_checkpointing=settings.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        disable_dropout=False,   # done in load_policy_base, sparing the LoRA dropout
        logging_steps=settings.logging_steps, save_steps=settings.save_steps, save_total_limit=2,
        report_to="none", use_cpu=device == "cpu", bf16=device == "cuda" and spec.dtype in ("auto", "bfloat16"),
        fp16=False, dataloader_num_workers=0, ddp_find_unused_parameters=False)
    train = Dataset.from_list(preference_rows(data.train_path, tok, "dataset train set"))
    held_out = Dataset.from_list(preference_rows(data.eval_path, tok, "dataset.eval_fraction (held-out set)"))
    return DPOTrainer(model=model, ref_model=None, args=args, train_dataset=train, eval_dataset=held_out,
                      processing_class=tok, peft_config=lora_config(settings.lora), callbacks=callbacks)


# ---------------------------------------------------------------- held-out pairs


def pair_rewards(trainer) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per held-out pair: the implicit rewards of chosen and rejected, and the policy's own
    log-probs of both. The reference log-probs are TRL's (`compute_ref_log_probs`: adapter off);
    the policy's are the same fused forward with the adapter on, as `_compute_loss` takes them."""
    import torch
    model, beta = trainer.model, trainer.beta
    was_training = model.training
    model.eval()
    out: tuple[list, list, list, list] = ([], [], [], [])
    try:
        for batch in trainer.get_eval_dataloader():
            inputs = trainer._prepare_inputs(batch)
            mask = inputs["completion_mask"]
            kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps",
                                                                   "ref_rejected_logps")}
            labels = inputs["input_ids"].masked_fill(mask == 0, -100)
            with torch.no_grad(), trainer.accelerator.autocast():
                logps = model(**kwargs, labels=labels, use_cache=False, fused_lm_head=True).log_probs
                ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, inputs)
            chosen, rejected = logps[:, -(mask.size(1) - 1):].sum(1).chunk(2)
            for lst, v in zip(out, (beta * (chosen - ref_chosen), beta * (rejected - ref_rejected), chosen, rejected)):
                lst.extend(v.float().tolist())
    finally:
        model.train(was_training)
    return out


def measure(trainer, suffix: str) -> tuple[dict, list[float]]:
    """TRL's evaluation and the per-pair figures with standard errors; returns (metrics, margins)."""
    trl = trainer.evaluate()
    chosen, rejected, lp_chosen, lp_rejected = pair_rewards(trainer)
    margins = [c - r for c, r in zip(chosen, rejected)]
    figures = {"accuracy": [float(m > 0) for m in margins], "margin": margins, "reward_chosen": chosen,
               "reward_rejected": rejected, "logp_accuracy": [float(c > r) for c, r in zip(lp_chosen, lp_rejected)]}
    metrics = {"eval_loss" + suffix: float(trl["eval_loss"])}
    for name, xs in figures.items():
        mean, se = stats.mean_se(xs)
        metrics[name + suffix] = mean
        if not math.isnan(se):
            metrics[f"{name}{suffix}_se"] = se
    metrics["trl_accuracy" + suffix] = float(trl["eval_rewards/accuracies"])   # batch-averaged, for comparison
    return metrics, margins


# ---------------------------------------------------------------- checkpoints and progress


def progress_callback():
    """Reports each logged step (loss, reward accuracy and margin) and stops on a non-finite loss."""
    from transformers import TrainerCallback

    class Reporting(TrainerCallback):   # under `accelerate launch` only the first process reports
        report = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.report = progress("dpo", f"dpo: training to step {state.max_steps}", state.max_steps,
                                       first_step=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            for key in ("loss", "grad_norm"):
                if key in logs and not math.isfinite(logs[key]):
                    raise TrainingDiverged(f"dpo: {key} became {logs[key]} at step {state.global_step}; "
                                           "lower learning_rate or raise beta")
            if self.report is not None and "loss" in logs:
                self.report.update(state.global_step, {k: v for k, v in logs.items() if isinstance(v, (int, float))})

        def on_train_end(self, args, state, control, **kwargs):
            if self.report is not None:
                self.report.done(f"{state.global_step} steps")
    return Reporting()


# ---------------------------------------------------------------- the stage


def run(ctx: StageContext, inputs: Inputs) -> TunedPolicyResult:
    """Measure the held-out pairs, train (resuming from the newest complete checkpoint), measure
    again, then write the adapter, dpo.json and the log into the stage folder in one rename."""
    t0, settings, out = time.time(), ctx.settings, Path(ctx.out_dir)
    ckpt_root = ctx.checkpoints()
    resume, resumed_step = store.latest(ckpt_root, "checkpoint", store.trainer_complete)
    trainer = build_trainer(settings, ctx.model, inputs["merge"].merged_path, inputs["dataset"], ctx.device,
                            ckpt_root, ctx.seed, callbacks=[progress_callback()])
    before, margins_before = measure(trainer, "_before")   # the adapter is fresh here even when resuming
    try:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except Exception as e:
        if is_disk_full(e):   # a checkpoint cut off mid-save must not look like a resume point
            store.prune_incomplete(ckpt_root, "checkpoint", store.trainer_complete)
        raise
    if not math.isfinite(output.training_loss):
        raise TrainingDiverged(f"dpo: training loss is {output.training_loss}; lower learning_rate or raise beta")
    after, margins_after = measure(trainer, "")
    gain, gain_se = stats.paired(margins_before, margins_after)
    steps = trainer.state.global_step
    metrics = {**before, **after, "margin_gain": gain, "train_loss": float(output.training_loss),
               "steps": float(steps), "n_eval": float(len(margins_after)),
               "train_runtime_s": float(output.metrics.get("train_runtime", 0.0))}
    if not math.isnan(gain_se):
        metrics["margin_gain_se"] = gain_se
    with staged_dir(out) as tmp:
        trainer.model.save_pretrained(tmp / "adapter", safe_serialization=True)
        trainer.processing_class.save_pretrained(tmp / "adapter")
        write_json(tmp / "dpo.json", {"settings": settings.model_dump(), "metrics": metrics,
                                      "merged_path": inputs["merge"].merged_path})
        write_json(tmp / "log_history.json", trainer.state.log_history)
    return TunedPolicyResult(stage="dpo", output_dir=str(out), adapter_path=str(out / "adapter"), steps=steps,
                             metrics=metrics, artifacts={"adapter": str(out / "adapter"), "dpo": str(out / "dpo.json"),
                                                         "log_history": str(out / "log_history.json")},
                             seconds=time.time() - t0, resumed_from_step=resumed_step)


def check(pipeline, settings: DpoSettings, before_run: bool) -> None:
    """DPO learns from pairs; any other dataset format has no `chosen`/`rejected` to compare."""
    require_preference_data(pipeline, "dpo")


def plan(s: DpoSettings, inputs) -> dict:
    """Chosen and rejected per pair through the policy (with grad) and the same weights with the
    adapter off (no grad: its logits only)."""
    from shomin.tasks.models import memory as mem
    rows = 2 * s.micro_batch_size
    terms = mem.adapter_training(inputs, s.quantization, s.lora, rows, s.max_length, s.gradient_checkpointing)
    _, _, pb = mem.weights(inputs.shape, s.quantization, inputs.spec, inputs.device)
    terms["reference"] = mem.logits(rows, s.max_length, inputs.shape, with_grad=False, dtype_bytes=pb)
    return {**terms, "total": sum(terms.values())}


STAGE = Stage("dpo", DpoSettings, run, plan=plan, check=check, needs=("dataset", "merge"), checkpoints=True,
              lower=("micro_batch_size", "max_length"),
              advice="set stages.dpo.quantization: 4bit, or turn on stages.dpo.gradient_checkpointing",
              help="Direct Preference Optimization: a LoRA on the merged SFT model trained on chosen/rejected pairs; "
                   "the reference is the same weights with the adapter off.")
