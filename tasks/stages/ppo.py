"""Stage ppo: RLHF of the merged SFT model with PPO against a reward function.

Seed 003's recipe: after SFT and the 16-bit merge, train a *second* LoRA on the
frozen merged model. The reference model of the KL penalty is that same model
with the adapter switched off (`disable_adapter()`), so one copy of the weights
serves as policy and reference. A small value head on the last hidden state is
trained alongside. Each step is the classic loop of Ziegler et al. (2019):

    rollout -> score -> advantages (KL-shaped rewards, GAE) -> update (clipped PPO)

The tensor maths lives in tasks/models/ppo_math.py, a step's advantages and update in
tasks/models/ppo_step.py, its checkpoints in tasks/models/ppo_checkpoint.py; rollouts,
log-probs and scoring, shared with evaluate, in tasks/models/rl.py. Under `accelerate launch` it is data-parallel:
each process samples its own queries, and the processes average their gradients after each
mini-batch (levers/data_parallel.py); on one process it is plain torch.
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from shomin.tasks.ground.contract import GIB, Inputs, Stage, StageContext
from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.ground.progress import progress
from shomin.tasks.ground.records import PolicyRecord, PpoResult
from shomin.tasks.ground.rundir import staged_dir, write_json
from shomin.tasks.ground.settings import LoraSettings, ModelSpec, RewardSettings, Strict
from shomin.tasks.models import memory as mem
from shomin.tasks.models.levers import selective_checkpoint
from shomin.tasks.models.levers.data_parallel import broadcast_from_first
from shomin.tasks.models.levers.int4_weights import SLICE_BYTES
from shomin.tasks.models.loading import load_causal_lm, load_tokenizer, lora_config
from shomin.tasks.models.ppo_checkpoint import checkpoints, load_checkpoint, save_checkpoint, save_policy
from shomin.tasks.models.ppo_math import kl_controller
from shomin.tasks.models.ppo_step import advantages, update
from shomin.tasks.models.reward import build_reward, check_reward, check_trained_reward
from shomin.tasks.models.rl import PolicyWithValue, build_queries, eos_token_ids, rollout, score


class PpoSettings(Strict):
    reward: RewardSettings = Field(default_factory=RewardSettings)
    quantization: Literal["none", "8bit", "4bit"] = Field("none", description="Load the merged policy base quantized (the seed used 8bit).")
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings(r=16, alpha=32, dropout=0.0),
                               description="The policy's LoRA. dropout must be 0: the policy stays in eval mode so "
                                           "the PPO ratio and the KL are taken on the very function that sampled.")
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
    gradient_checkpointing: bool | Literal["selective"] = Field(
        False, description="true: keep only each layer's input during the update and recompute the rest in the "
        "backward pass: less memory (most of a 20B model's activations), one more forward per mini-batch. "
        "selective: recompute only each layer's post-attention norm + MLP and its attention (not the "
        "attention's projections): most of that saving for less recompute (GPT-NeoX, Llama, Qwen, Mistral "
        "layouts).")
    cuda_graphs: bool = Field(True, description="On CUDA, replay CUDA graphs where the host issuing ops one by one "
                              "is slower than the GPU: the rollout's decode step (recorded once per rollout, on a "
                              "fixed-size KV cache) and the update's forward + backward (recorded once per PPO "
                              "step, replayed for every mini-batch: they share the rollout's shape). "
                              "Each graph and its memory are let go when its phase ends. Off: op by op, the "
                              "rollout through generate().")
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
        if self.lora.dropout:
            raise ValueError(f"lora.dropout {self.lora.dropout} would have no effect: the PPO policy stays in eval mode "
                             "so the ratio and KL are taken on the function that sampled; set lora.dropout: 0")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of mini_batch_size {self.mini_batch_size}")
        return self


def build_policy(settings: PpoSettings, spec: ModelSpec, merged_path: str, device: str) -> PolicyWithValue:
    """The merged model (quantized as asked) + a fresh LoRA + a value head. The frozen weights keep
    their 16-bit dtype: PEFT's k-bit preparation would copy embeddings, LM head and norms to float32
    (+1.2 GiB at 20B) for a base that is never trained."""
    from peft import get_peft_model
    lm = load_causal_lm(merged_path, spec, device, quantization=settings.quantization)
    if settings.gradient_checkpointing is True:
        # no RNG state to save for the recompute (eval mode draws none), and reading it would break a CUDA graph
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                        "preserve_rng_state": False})
    elif settings.gradient_checkpointing == "selective" and not selective_checkpoint.enable(lm):
        raise ConfigError(f"stages.ppo.gradient_checkpointing: selective needs decoder layers with a "
                          f"post_attention_layernorm and an mlp; {type(lm).__name__} has none: use true")
    lm = get_peft_model(lm, lora_config(settings.lora))  # LoRA B starts at 0: step-0 policy == reference
    # Dropout stays off (eval mode) throughout: PPO's ratio and the KL need rollout and update to be the same function.
    return PolicyWithValue(lm, settings.temperature).eval()


def run(ctx: StageContext, inputs: Inputs) -> PpoResult:
    """rollout -> score -> advantages -> update, `steps` times; resumes from ctx's checkpoints."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import set_seed
    t0, settings, spec, seed, device = time.time(), ctx.settings, ctx.model, ctx.seed, ctx.device
    merged_path = inputs["merge"].merged_path
    # device_placement=False: the model is already where load_causal_lm put it (bnb models must not move).
    accelerator = Accelerator(cpu=device == "cpu", device_placement=False)
    rank = accelerator.process_index
    set_seed(seed + rank)  # each process samples differently; rank 0 == a plain single-process run
    ckpt_root = ctx.checkpoints()

    tok = load_tokenizer(merged_path, spec.trust_remote_code)
    tok.padding_side = "left"  # prompts end where generation starts
    policy = build_policy(settings, spec, merged_path, device)
    loaded_gib = torch.cuda.memory_allocated() / GIB if device.startswith("cuda") else None   # weights alone
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
    kl_ctl = kl_controller(settings.init_kl_coef, settings.target_kl, settings.kl_horizon)
    resumed = (checkpoints(ckpt_root) or [None])[-1]
    start, log = load_checkpoint(resumed, policy, optimizer, kl_ctl) if resumed else (0, [])
    # Data parallel without DDP's wrapper, which a CUDA graph of the update cannot hold
    # (levers/data_parallel.py): the same start everywhere, gradients averaged per mini-batch.
    optimizer = accelerator.prepare(optimizer)
    if accelerator.num_processes > 1:
        broadcast_from_first(params)
    trained = inputs.get("reward_model")
    reward_fn = build_reward(settings.reward, device, trained=trained.model_path if trained else None)
    queries = build_queries(inputs["dataset"].train_path, tok, settings, seed)
    eos_ids = eos_token_ids(tok, policy.lm, policy.v_head.weight.device)
    graphed = settings.cuda_graphs and eos_ids.is_cuda

    bar = tqdm(range(start + 1, settings.steps + 1), initial=start, total=settings.steps, desc="ppo",
               disable=not accelerator.is_local_main_process or os.environ.get("TQDM_DISABLE") == "1")
    report = progress("ppo", f"ppo: {settings.steps} steps of {settings.batch_size} queries, reward "
                      f"{settings.reward.kind}", settings.steps, first_step=start)
    for step in bar:
        t_step = time.time()
        rng = random.Random(f"{seed}-{rank}-{step}")  # batch and length depend on the step only: resumable
        batch_queries = [queries[i] for i in rng.sample(range(len(queries)), min(settings.batch_size, len(queries)))]
        length = rng.randint(settings.response_min_tokens, settings.response_max_tokens)
        batch = rollout(policy, tok, batch_queries, settings, length, eos_ids, graphed=graphed)
        t_rollout = time.time()
        scores = score(reward_fn, tok, batch)
        kl, entropy = advantages(policy, batch, scores, settings, kl_ctl.value)
        t_update = time.time()
        stats = update(policy, optimizer, accelerator, params, batch, settings, step)
        all_scores, all_kl = accelerator.gather(scores), accelerator.gather(kl)
        entry = {"step": step, "reward_mean": all_scores.mean().item(),
                 "reward_std": all_scores.std().item() if all_scores.numel() > 1 else 0.0,
                 "kl": all_kl.mean().item(), "kl_coef": kl_ctl.value, "entropy": entropy.item(), **stats,
                 "response_length": batch["response_mask"].sum(1).float().mean().item(),
                 "step_seconds": time.time() - t_step, "rollout_seconds": t_rollout - t_step,
                 "update_seconds": time.time() - t_update}
        kl_ctl.update(entry["kl"], settings.batch_size * accelerator.num_processes)
        log.append(entry)
        bar.set_postfix(reward=f"{entry['reward_mean']:.3f}", kl=f"{entry['kl']:.3f}")
        if accelerator.is_main_process:
            report.update(step, {k: entry[k] for k in ("reward_mean", "kl", "kl_coef", "entropy", "step_seconds")}
                          | {"lr": optimizer.param_groups[0]["lr"]})
        if accelerator.is_main_process and (step % settings.save_steps == 0 or step == settings.steps):
            save_checkpoint(ckpt_root, step, policy, optimizer, kl_ctl.value, log)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_outputs(ctx, policy, tok, log, merged_path)
        report.done(f"reward {log[-1]['reward_mean']:.3f}, KL {log[-1]['kl']:.3f}" if log else "no steps")
    accelerator.wait_for_everyone()
    result = _result(ctx, log, kl_ctl.value, t0, start if resumed is not None else None)
    if loaded_gib is not None:   # what the peak is measured against: the overhead is peak - weights
        result.metrics["weights_gpu_gib"] = loaded_gib
    return result


def _write_outputs(ctx: StageContext, policy: PolicyWithValue, tok, log: list, merged_path: str) -> None:
    with staged_dir(ctx.out_dir) as tmp:
        save_policy(policy, tmp)
        tok.save_pretrained(tmp / "adapter")
        write_json(tmp / "ppo_log.json", log)
        if ctx.settings.merge_adapter:
            save_merged(merged_path, tmp / "adapter", ctx.model, tmp / "merged")


def _result(ctx: StageContext, log: list, kl_coef: float, t0: float, resumed_from: int | None) -> PpoResult:
    out, settings = Path(ctx.out_dir), ctx.settings
    merged_path = str(out / "merged") if settings.merge_adapter else None
    last = log[-3:] or [{"reward_mean": 0.0, "kl": 0.0}]
    metrics = {"reward_final": sum(e["reward_mean"] for e in last) / len(last), "kl": last[-1]["kl"],
               "reward_first": log[0]["reward_mean"] if log else 0.0, "kl_coef": kl_coef, "steps": float(len(log))}
    artifacts = {"adapter": str(out / "adapter"), "value_head": str(out / "value_head.safetensors"),
                 "ppo_log": str(out / "ppo_log.json"), **({"merged": merged_path} if merged_path else {})}
    policy = PolicyRecord.model_validate(settings.model_dump(include=set(PolicyRecord.model_fields)))
    return PpoResult(stage="ppo", output_dir=str(out), adapter_path=str(out / "adapter"),
                     value_head_path=str(out / "value_head.safetensors"), merged_path=merged_path,
                     steps=len(log), metrics=metrics, artifacts=artifacts, seconds=time.time() - t0,
                     resumed_from_step=resumed_from, policy=policy)


def save_merged(merged_path: str, adapter_dir: Path, spec: ModelSpec, dest: Path) -> None:
    """Fold the PPO adapter into an unquantized reload (bitsandbytes layers cannot merge exactly)."""
    from peft import PeftModel
    from transformers import AutoConfig
    dtype = AutoConfig.from_pretrained(merged_path).dtype or torch.float32
    base = load_causal_lm(merged_path, spec, "cpu", quantization="none", dtype=dtype)
    PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().save_pretrained(dest, safe_serialization=True)
    load_tokenizer(merged_path, spec.trust_remote_code).save_pretrained(dest)




def plan(ppo: PpoSettings, inputs: mem.PlanInputs) -> dict:
    """Weights at ppo.quantization (frozen weights stay 16-bit) + LoRA states + value head + the
    largest of the three phases, which alternate: rollouts (KV cache), the one no-grad pass of
    policy and reference (twice the batch; one layer's activations and the 16-bit logits of the
    response positions) and the update (one mini-batch's activations, all layers' or, under
    gradient checkpointing, each layer's input + one layer's, and its response logits; recorded
    as a CUDA graph it measured the same at 20B) + one dequantized layer weight of a 4-bit
    base on bitsandbytes' layer (one slice of rows under int4_matmul sliced / triton), or of an
    8-bit one under llm_int8 (the weight-only 8-bit GEMM dequantizes in registers on CUDA)."""
    shape, notes = inputs.shape, inputs.notes
    w, _, pb = mem.weights(shape, ppo.quantization, inputs.spec, inputs.device)
    n_lora, s = mem.lora_params(shape, ppo.lora), ppo.query_max_tokens + ppo.response_max_tokens
    r = ppo.response_max_tokens + 1   # logits_to_keep: the response's positions only
    gen = mem.kv_cache(ppo.batch_size, s, shape, pb)
    reference = mem.activations(2 * ppo.batch_size, s, shape, pb, checkpointing=True, with_inputs=False) \
        + 2 * ppo.batch_size * r * shape["vocab_size"] * pb   # one layer's activations, 16-bit response logits
    # eval mode: no dropout copies; `selective` checkpointing keeps all but the MLPs' share
    act = mem.activations(ppo.mini_batch_size, s, shape, pb, ppo.gradient_checkpointing is True,
                          mlp_chunk=1 if ppo.gradient_checkpointing == "selective" else 0)
    logits = mem.logits(ppo.mini_batch_size, r, shape, dtype_bytes=pb)
    largest = max(i * o for i, o, _ in shape["linears"].values())
    dequant = largest * pb if (ppo.quantization == "4bit" and inputs.spec.int4_matmul == "bitsandbytes") or (
        ppo.quantization == "8bit" and inputs.spec.int8_matmul == "llm_int8") else 0
    if ppo.quantization == "4bit" and inputs.spec.int4_matmul != "bitsandbytes":   # one slice of rows at most
        dequant = min(largest * pb, SLICE_BYTES)
    head = 16 * (shape["hidden_size"] + 1)
    notes["ppo.weights"] = f"{ppo.quantization}: stages.ppo.quantization"
    notes["ppo.lora"] = f"{n_lora:,} params x (4 B weight + 4 B grad)"
    notes["ppo.generation"] = f"batch={ppo.batch_size} s={s}"
    notes["ppo.total"] = "weights + lora + optimizer + value_head + dequant + max(generation, reference, activations + logits)"
    return {"weights": w, "lora": 8 * n_lora, "optimizer": 8 * n_lora, "value_head": head, "generation": gen,
            "reference": reference, "activations": act, "logits": logits, "dequant": dequant,
            "total": w + 16 * n_lora + head + dequant + max(gen, reference, act + logits)}


def check(pipeline, settings: PpoSettings, before_run: bool) -> None:
    check_reward(settings.reward, before_run, "stages.ppo.reward")
    check_trained_reward(pipeline, settings.reward, "stages.ppo.reward")


STAGE = Stage("ppo", PpoSettings, run, plan=plan, check=check, needs=("merge", "dataset"), uses=("reward_model",),
              checkpoints=True,
              lower=("mini_batch_size", "batch_size", "response_max_tokens"),
              advice="set stages.ppo.quantization: 4bit",
              help="RLHF: a second LoRA on the merged model, trained with PPO against a reward; "
                   "the reference is the same weights with the adapter off.")
