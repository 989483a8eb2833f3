"""Stage reward_model: a LoRA reward model on the merged SFT model, trained with TRL's RewardTrainer.

The merged SFT model is loaded as a sequence classifier with one output (a new `score`
head on the last token) and a LoRA is trained on it with the pairwise loss
-log sigmoid(r(chosen) - r(rejected)). PEFT's SEQ_CLS task trains and saves the score
head whole beside the adapter, so the output folder is the adapter + head + tokenizer,
loadable with peft on top of the merged model (tasks/models/trained_reward.py). PPO's
reward kind `trained` scores with it.

The pairs are tokenized here with the same function that scores later (trained_reward.
token_ids), so the text a reward sees in training and in use cannot drift apart; TRL
skips its own processing of tokenized rows. Held-out pairs are scored before and after
training: the accuracy before is the chance level of the random head, the one after is
what the model learnt. Checkpoints and resuming work as in sft.
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
from shomin.tasks.ground.preferences import require_preference_data
from shomin.tasks.ground.progress import progress
from shomin.tasks.ground.records import RewardModelResult
from shomin.tasks.ground.rundir import read_jsonl, staged_dir, write_json
from shomin.tasks.ground.settings import LoraSettings, ModelSpec, Strict
from shomin.tasks.models.chat import require_template
from shomin.tasks.models.loading import (DTYPES, MODEL_CREATION, guard_bnb_cpu, load_tokenizer, lora_config, quantization_config,
                                         resolve_dtype)
from shomin.tasks.models.trained_reward import RECORD, pair_metrics, pair_texts, score_pairs, scorer, token_ids


class RewardModelSettings(Strict):
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The reward model's LoRA; the score head is trained whole beside it.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (linear decay to 0).")
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs.")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps; -1 = run the epochs.")
    batch_size: int = Field(8, gt=0, description="Effective batch (pairs per optimizer step).")
    micro_batch_size: int = Field(4, gt=0, description="Pairs per forward pass (each one chosen and one rejected sequence); batch_size / micro_batch_size steps are accumulated.")
    max_length: int = Field(512, gt=0, description="Tokens of prompt + answer; pairs with a longer side are left out, in training and in the held-out scores.")
    logging_steps: int = Field(5, gt=0, description="Log loss, accuracy and margin every N steps.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N steps (resumable).")
    quantization: Literal["none", "4bit"] = Field("none", description="4bit: load the merged base in bitsandbytes 4-bit (QLoRA, model.bnb_4bit_* settings); the LoRA in bfloat16 as TRL keeps it for QLoRA, the score head in float32.")
    center_rewards_coefficient: float | None = Field(None, ge=0, description="Weight of a penalty on the squared rewards that keeps them centred on zero (Eisenstein et al. 2023); 0.01 is usual; null = off.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")

    @model_validator(mode="after")
    def _accumulation(self) -> "RewardModelSettings":
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of micro_batch_size {self.micro_batch_size}")
        return self


def text_pairs(tok, rows: list[dict], where: str) -> list[dict]:
    """Rows as string pairs {"chosen", "rejected"} of full texts (prompt + answer)."""
    if rows and isinstance(rows[0]["chosen"], list):
        require_template(tok, where)
    return [dict(zip(("chosen", "rejected"), pair_texts(tok, r))) for r in rows]


def tokenized(tok, pairs: list[dict], max_length: int) -> list[dict]:
    """TRL's processed form; pairs with a side over max_length are left out, as TRL would."""
    rows = [{"chosen_ids": token_ids(tok, p["chosen"]), "rejected_ids": token_ids(tok, p["rejected"])} for p in pairs]
    return [r for r in rows if max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= max_length]


def load_classifier(merged_path: str, spec: ModelSpec, settings: RewardModelSettings, device: str, pad_id: int):
    """The merged SFT model as a one-output sequence classifier with the LoRA on it."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.utils import disable_dropout_in_model
    qconf = quantization_config(settings.quantization, spec)
    with MODEL_CREATION:
        model = AutoModelForSequenceClassification.from_pretrained(
            merged_path, num_labels=1, use_safetensors=True, trust_remote_code=spec.trust_remote_code,
            dtype=DTYPES[spec.compute_dtype] if qconf else resolve_dtype(spec.dtype, device),
            quantization_config=qconf, device_map={"": device} if qconf else None)
    model.config.pad_token_id = pad_id   # the classifier finds each row's last token by it
    if qconf is None:
        model.to(device)
    else:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # the base's own dropout adds noise between the two sides of a pair (TRL turns it off), but
    # TRL's switch would also zero the LoRA dropout the settings ask for: turn it off before LoRA
    disable_dropout_in_model(model)
    model = get_peft_model(model, lora_config(settings.lora, task_type="SEQ_CLS"))   # + score in modules_to_save
    if device == "cpu":
        guard_bnb_cpu(model)
    return model


def progress_callback():
    """Reports each logged step (loss, accuracy, margin) to whoever watches the stage."""
    from transformers import TrainerCallback

    class Reporting(TrainerCallback):
        report = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.report = progress("reward_model", f"reward_model: training to step {state.max_steps}",
                                       state.max_steps, first_step=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.report is not None and "loss" in (logs or {}):
                if not math.isfinite(logs["loss"]):
                    raise TrainingDiverged(f"reward_model: loss became {logs['loss']} at step {state.global_step}; "
                                           "lower learning_rate or check the data")
                self.report.update(state.global_step, dict(logs))

        def on_train_end(self, args, state, control, **kwargs):
            if self.report is not None:
                self.report.done(f"{state.global_step} steps")
    return Reporting()


def build_trainer(ctx: StageContext, model, tok, train_rows: list[dict]):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer
    s, spec = ctx.settings, ctx.model
    compute = spec.compute_dtype if s.quantization == "4bit" else spec.dtype
    args = RewardConfig(
        output_dir=str(ctx.checkpoints()), seed=ctx.seed, data_seed=ctx.seed,
        per_device_train_batch_size=s.micro_batch_size, gradient_accumulation_steps=s.batch_size // s.micro_batch_size,
        learning_rate=s.learning_rate, num_train_epochs=s.epochs, max_steps=s.max_steps,
        max_length=s.max_length, center_rewards_coefficient=s.center_rewards_coefficient,
        gradient_checkpointing=s.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        disable_dropout=False,   # done in load_classifier, sparing the LoRA dropout
        logging_steps=s.logging_steps, save_steps=s.save_steps, save_total_limit=2,
        report_to="none", use_cpu=ctx.device == "cpu", bf16=ctx.device == "cuda" and compute in ("auto", "bfloat16"),
        fp16=False, dataloader_num_workers=0, ddp_find_unused_parameters=False)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                            processing_class=tok, callbacks=[progress_callback()])
    if s.quantization == "4bit":   # TRL casts trainable weights to bf16 for QLoRA; the head must match the fp32 stream
        for name, p in trainer.model.named_parameters():
            if p.requires_grad and "score" in name:
                p.data = p.data.float()
    return trainer


def run(ctx: StageContext, inputs: Inputs) -> RewardModelResult:
    """Train into the checkpoint folder (resuming from its newest complete checkpoint), score the
    held-out pairs before and after, write the adapter + head + tokenizer."""
    t0, s, out = time.time(), ctx.settings, Path(ctx.out_dir)
    data, base = inputs["dataset"], inputs["merge"].merged_path
    tok = load_tokenizer(base, ctx.model.trust_remote_code)
    train = tokenized(tok, text_pairs(tok, read_jsonl(data.train_path), "stages.reward_model"), s.max_length)
    if not train:
        raise ConfigError(f"stages.reward_model.max_length: every training pair is longer than {s.max_length} tokens; raise it")
    held_out = [p for p in text_pairs(tok, read_jsonl(data.eval_path), "stages.reward_model")
                if max(len(token_ids(tok, p["chosen"])), len(token_ids(tok, p["rejected"]))) <= s.max_length]
    from transformers import set_seed
    set_seed(ctx.seed)   # the score head and LoRA's A are drawn at load: same seed, same start
    model = load_classifier(base, ctx.model, s, ctx.device, tok.pad_token_id)
    score = scorer(model, tok, batch_size=2 * s.micro_batch_size)
    before = pair_metrics(*score_pairs(score, held_out), suffix="_before")
    resume, resumed_step = store.latest(ctx.checkpoints(), "checkpoint", store.trainer_complete)
    trainer = build_trainer(ctx, model, tok, train)
    try:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except Exception as e:
        if is_disk_full(e):   # a checkpoint cut off mid-save must not look like a resume point
            store.prune_incomplete(ctx.checkpoints(), "checkpoint", store.trainer_complete)
        raise
    if not math.isfinite(output.training_loss):
        raise TrainingDiverged(f"reward_model: training loss is {output.training_loss}; lower learning_rate")
    metrics = {**pair_metrics(*score_pairs(score, held_out)), **before, "train_loss": float(output.training_loss),
               "steps": float(trainer.state.global_step), "n_train": float(len(train)), "n_eval": float(len(held_out))}
    record = {"base_path": base, "trust_remote_code": ctx.model.trust_remote_code, "max_length": s.max_length}
    with staged_dir(out) as tmp:
        trainer.model.save_pretrained(tmp / "model", safe_serialization=True)
        tok.save_pretrained(tmp / "model")
        write_json(tmp / "model" / RECORD, record)
        write_json(tmp / "reward_model.json", {**record, "metrics": metrics, "settings": s.model_dump()})
        write_json(tmp / "log_history.json", trainer.state.log_history)
    return RewardModelResult(stage="reward_model", output_dir=str(out), model_path=str(out / "model"), base_path=base,
                             metrics=metrics, artifacts={"model": str(out / "model"),
                                                         "log_history": str(out / "log_history.json")},
                             seconds=time.time() - t0, resumed_from_step=resumed_step)


def check(pipeline, settings: RewardModelSettings, before_run: bool) -> None:
    """A reward model learns from pairs; any other dataset format has none."""
    require_preference_data(pipeline, "reward_model")


def plan(s: RewardModelSettings, inputs) -> dict:
    """A chosen and a rejected sequence per pair, one scalar out (no vocabulary logits)."""
    from shomin.tasks.models import memory as mem
    terms = mem.adapter_training(inputs, s.quantization, s.lora, 2 * s.micro_batch_size, s.max_length,
                                 s.gradient_checkpointing, logit_rows=0)
    return {**terms, "total": sum(terms.values())}


STAGE = Stage("reward_model", RewardModelSettings, run, plan=plan, check=check, needs=("dataset", "merge"), checkpoints=True,
              needs_dataset_spec=True, lower=("micro_batch_size", "max_length"),
              advice="set stages.reward_model.quantization: 4bit, or turn on stages.reward_model.gradient_checkpointing",
              help="A LoRA reward model (with a trained score head) on the merged SFT model, trained on "
                   "preference pairs with TRL's RewardTrainer; PPO's reward kind `trained` scores with it.")
