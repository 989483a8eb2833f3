"""Stage grpo: RLHF of the merged SFT model with GRPO (or RLOO) against a reward.

PPO's sibling without a value head. For each prompt a *group* of `num_generations`
completions is sampled; a completion's advantage is its reward against the rest of
its group (GRPO: minus the group mean, over the group's std; RLOO: minus the mean of
the *other* completions), so no critic has to be trained. TRL's GRPOTrainer / RLOOTrainer
run the loop; this module only feeds them what the pipeline has:

- the prompts: `build_queries` of tasks/models/rl.py, as PPO (text rows: the opening
  N tokens; prompt, preference and chat rows: the prompt);
- the reward: `build_reward` (vader, hf-classifier, function, or the run's own reward
  model), judging prompt + completion decoded without special tokens, as PPO's `score`;
- the policy: a fresh LoRA on the merged model, passed as `peft_config`. TRL then keeps
  no reference model: with `beta > 0` it takes the reference log-probs under
  `disable_adapter()`, so one copy of the weights is both policy and reference, and
  LoRA's B = 0 makes the KL exactly 0 before the first update.

Checkpoints are the Trainer's `checkpoint-N` in the stage's keyed folder; a rerun resumes
from the newest complete one. The result carries a `PolicyRecord`, so evaluate samples
the policy as it was trained.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from shomin.tasks.ground import checkpoints as store
from shomin.tasks.ground.contract import Inputs, Stage, StageContext
from shomin.tasks.ground.errors import TrainingDiverged, is_disk_full
from shomin.tasks.ground.progress import progress
from shomin.tasks.ground.records import PolicyRecord, TunedPolicyResult
from shomin.tasks.ground.rundir import staged_dir, write_json
from shomin.tasks.ground.settings import LoraSettings, RewardSettings, Strict
from shomin.tasks.models.loading import load_causal_lm, load_tokenizer, lora_config
from shomin.tasks.models.reward import build_reward, check_reward, check_trained_reward
from shomin.tasks.models.rl import build_queries


class GrpoSettings(Strict):
    algorithm: Literal["grpo", "rloo"] = Field("grpo", description="grpo: advantage = (reward - group mean) / group std, "
                                               "KL as a loss term; rloo: advantage = reward - mean of the other "
                                               "completions of the prompt, KL folded into the reward.")
    reward: RewardSettings = Field(default_factory=RewardSettings, description="What scores prompt + completion text.")
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings(r=16, alpha=32, dropout=0.0),
                               description="The policy's LoRA. dropout must be 0: the KL to the reference is taken "
                                           "on the function that sampled.")
    steps: int = Field(20, gt=0, description="Optimizer steps (one group of completions per prompt each).")
    batch_size: int = Field(4, gt=0, description="Prompts per optimizer step (per process); each gets "
                                                 "num_generations completions.")
    num_generations: int = Field(4, ge=2, description="Group size: completions sampled per prompt (2 at least: the "
                                                      "advantage compares a completion with its group).")
    learning_rate: float = Field(1e-5, gt=0, description="Constant learning rate of the LoRA (AdamW).")
    beta: float = Field(0.1, gt=0, description="KL coefficient towards the reference (the merged model, adapter off).")
    query_min_tokens: int = Field(2, gt=0, description="Text rows: prompts are the opening N tokens, N at least this.")
    query_max_tokens: int = Field(8, gt=0, description="Text rows: prompts are the opening N tokens, N at most this.")
    response_max_tokens: int = Field(16, gt=0, description="Most new tokens per completion (ends earlier at EOS).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (the log-probs are taken at it too).")
    top_k: int = Field(0, ge=0, description="Top-k filtering while sampling; 0 = none.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold; 1 = none.")
    save_steps: int = Field(10, gt=0, description="Checkpoint every N steps (resumable).")
    logging_steps: int = Field(1, gt=0, description="Log reward, KL and loss every N steps.")
    quantization: Literal["none", "4bit"] = Field("none", description="Load the merged policy base in 4-bit (QLoRA).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory in the updates.")

    @model_validator(mode="after")
    def _ranges(self) -> "GrpoSettings":
        if self.query_min_tokens > self.query_max_tokens:
            raise ValueError("query_min_tokens must be <= query_max_tokens")
        if self.lora.dropout:
            raise ValueError(f"lora.dropout {self.lora.dropout}: the KL to the reference would be taken on a "
                             "different function than the one that sampled; set lora.dropout: 0")
        return self


# ---------------------------------------------------------------- pieces


def reward_function(reward_fn, tok, name: str):
    """TRL calls a reward function with prompts and completion ids per completion. The reward
    judges what a reader sees, prompt + completion decoded without special tokens (a rendered
    chat prompt loses its markers), exactly as PPO's `score` does."""
    def reward(prompts, completion_ids, **_):
        return reward_fn([tok.decode(tok(p).input_ids + list(ids), skip_special_tokens=True)
                          for p, ids in zip(prompts, completion_ids)])
    reward.__name__ = name  # TRL logs rewards/<name>/mean
    return reward


def prompt_rows(queries: list[str], batch_size: int) -> list[dict]:
    """TRL's sampler drops a batch short of `batch_size` prompts (every process's): a smaller set is repeated."""
    return [{"prompt": q} for q in queries * math.ceil(batch_size / len(queries))]


def trainer_config(settings: GrpoSettings, spec, device: str, output_dir: Path, seed: int):
    """GRPOConfig / RLOOConfig: one optimizer step per generated batch of batch_size x num_generations."""
    from trl import GRPOConfig, RLOOConfig
    config = GRPOConfig if settings.algorithm == "grpo" else RLOOConfig
    return config(
        output_dir=str(output_dir), seed=seed, data_seed=seed, max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size * settings.num_generations, gradient_accumulation_steps=1,
        num_generations=settings.num_generations, max_completion_length=settings.response_max_tokens,
        temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, beta=settings.beta,
        learning_rate=settings.learning_rate, lr_scheduler_type="constant",  # as PPO: no decay over a short run
        gradient_checkpointing=settings.gradient_checkpointing,
        **({"gradient_checkpointing_kwargs": {"use_reentrant": False}} if settings.gradient_checkpointing else {}),
        logging_steps=settings.logging_steps, save_steps=settings.save_steps, save_total_limit=2,
        report_to="none", use_cpu=device == "cpu", bf16=device == "cuda" and spec.dtype in ("auto", "bfloat16"),
        fp16=False, dataloader_num_workers=0)


def watch_callback(settings: GrpoSettings):
    """Stops on a non-finite loss or reward and reports each logged step to whoever watches."""
    from transformers import TrainerCallback

    class Watch(TrainerCallback):   # under `accelerate launch` only the first process reports
        report = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.report = progress("grpo", f"{settings.algorithm}: {state.max_steps} steps of {settings.batch_size}"
                                       f" prompts x {settings.num_generations}, reward {settings.reward.kind}",
                                       state.max_steps, first_step=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            for key in ("loss", "reward", "kl"):
                if key in logs and not math.isfinite(logs[key]):
                    raise TrainingDiverged(f"grpo: {key} became {logs[key]} at step {state.global_step}; "
                                           "lower learning_rate or check the reward")
            if self.report is not None and "reward" in logs:
                self.report.update(state.global_step, {k: logs[k] for k in ("reward", "reward_std", "kl", "loss")
                                                        if k in logs})

        def on_train_end(self, args, state, control, **kwargs):
            if self.report is not None:
                rewards = [e["reward"] for e in state.log_history if "reward" in e]
                self.report.done(f"{state.global_step} steps" + (f", reward {rewards[-1]:.3f}" if rewards else ""))
    return Watch()


def build_trainer(ctx: StageContext, inputs: Inputs):
    """The TRL trainer on a fresh LoRA over the merged model; TRL holds no reference copy (see the docstring)."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import GRPOTrainer, RLOOTrainer
    settings, spec, device, merged_path = ctx.settings, ctx.model, ctx.device, inputs["merge"].merged_path
    set_seed(ctx.seed)  # the LoRA A matrices are drawn inside the trainer's constructor, before it seeds
    tok = load_tokenizer(merged_path, spec.trust_remote_code)
    lm = load_causal_lm(merged_path, spec, device, quantization=settings.quantization)
    if settings.quantization != "none":
        from peft import prepare_model_for_kbit_training
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=settings.gradient_checkpointing)
    trained = inputs["reward_model"].model_path if "reward_model" in inputs else None
    reward = reward_function(build_reward(settings.reward, device, trained=trained), tok, settings.reward.kind)
    queries = build_queries(inputs["dataset"].train_path, tok, settings, ctx.seed)
    args = trainer_config(settings, spec, device, ctx.checkpoints(), ctx.seed)
    rows = prompt_rows(queries, args.generation_batch_size // settings.num_generations)  # all processes' prompts
    trainer_cls = GRPOTrainer if settings.algorithm == "grpo" else RLOOTrainer
    return trainer_cls(model=lm, reward_funcs=reward, processing_class=tok, args=args,
                       train_dataset=Dataset.from_list(rows),
                       peft_config=lora_config(settings.lora), callbacks=[watch_callback(settings)])


# ---------------------------------------------------------------- the stage


def run(ctx: StageContext, inputs: Inputs) -> TunedPolicyResult:
    """Trains into ctx's checkpoint folder (the registry holds its lock), resuming from its newest
    complete checkpoint; the adapter, the log and a summary go to the stage folder at once."""
    t0, ckpt_root = time.time(), ctx.checkpoints()
    resume, resumed_step = store.latest(ckpt_root, "checkpoint", store.trainer_complete)
    trainer = build_trainer(ctx, inputs)
    try:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except Exception as e:
        if is_disk_full(e):   # a checkpoint-N cut off mid-save must not look like a resume point
            store.prune_incomplete(ckpt_root, "checkpoint", store.trainer_complete)
        raise
    log, steps = trainer.state.log_history, trainer.state.global_step
    policy = PolicyRecord.model_validate(ctx.settings.model_dump(include=set(PolicyRecord.model_fields)))
    metrics = summary_metrics(log, steps, output.metrics.get("train_runtime", 0.0))
    out = Path(ctx.out_dir)
    with staged_dir(out) as tmp:
        trainer.model.save_pretrained(tmp / "adapter", safe_serialization=True)
        trainer.processing_class.save_pretrained(tmp / "adapter")
        write_json(tmp / "log_history.json", log)
        write_json(tmp / "grpo.json", {"algorithm": ctx.settings.algorithm, "steps": steps, "metrics": metrics,
                                       "policy": policy.model_dump(), "settings": ctx.settings.model_dump()})
    artifacts = {name: str(out / name) for name in ("adapter", "log_history.json", "grpo.json")}
    return TunedPolicyResult(stage="grpo", output_dir=str(out), adapter_path=str(out / "adapter"), steps=steps,
                             metrics=metrics, artifacts=artifacts, seconds=time.time() - t0,
                             resumed_from_step=resumed_step, policy=policy)


def summary_metrics(log: list[dict], steps: int, runtime: float) -> dict[str, float]:
    """Mean reward of the first and the last logged step (before and after training, as near as
    the log gets), the KL to the reference at the end."""
    logged = [e for e in log if "reward" in e]
    first, last = (logged[0], logged[-1]) if logged else ({}, {})
    return {"reward_start": float(first.get("reward", 0.0)), "reward_end": float(last.get("reward", 0.0)),
            "kl": float(last.get("kl", 0.0)), "steps": float(steps), "train_runtime_s": float(runtime)}


def check(pipeline, settings: GrpoSettings, before_run: bool) -> None:
    check_reward(settings.reward, before_run, where="stages.grpo.reward")
    check_trained_reward(pipeline, settings.reward, "stages.grpo.reward")


def plan(s: GrpoSettings, inputs) -> dict:
    """batch_size x num_generations completions: sampled (KV cache), then through the policy with
    grad; rollouts and updates alternate, so the larger of the two counts."""
    from shomin.tasks.models import memory as mem
    rows, seq = s.batch_size * s.num_generations, s.query_max_tokens + s.response_max_tokens
    terms = mem.adapter_training(inputs, s.quantization, s.lora, rows, seq, s.gradient_checkpointing)
    _, _, pb = mem.weights(inputs.shape, s.quantization, inputs.spec, inputs.device)
    terms["generation"] = mem.kv_cache(rows, seq, inputs.shape, pb)
    fixed = terms["weights"] + terms["lora"] + terms["optimizer"]
    return {**terms, "total": fixed + max(terms["generation"], terms["activations"] + terms["logits"])}


STAGE = Stage("grpo", GrpoSettings, run, plan=plan, check=check, needs=("dataset", "merge"), uses=("reward_model",),
              checkpoints=True, lower=("batch_size", "num_generations", "response_max_tokens"),
              advice="set stages.grpo.quantization: 4bit or stages.grpo.gradient_checkpointing: true",
              help="RLHF without a critic: a second LoRA on the merged model, trained with GRPO (or RLOO) on groups "
                   "of sampled completions against a reward; the reference is the same weights with the adapter off.")
