"""Stage ppo: RLHF of the merged SFT model with PPO against a reward function.

Seed 003's recipe: after SFT and the 16-bit merge, train a *second* LoRA on the
frozen merged model. The reference model of the KL penalty is that same model
with the adapter switched off (`disable_adapter()`), so one copy of the weights
serves as policy and reference. A small value head on the last hidden state is
trained alongside. Each step is the classic loop of Ziegler et al. (2019):

    rollout -> score -> advantages (KL-shaped rewards, GAE) -> update (clipped PPO)

The tensor math lives in tasks/ppo_math.py. accelerate makes `accelerate launch`
data-parallel with no code change; on one process it is plain torch.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tasks.config import ConfigError, ModelSpec, PpoSettings
from tasks.data import DataResult, read_jsonl
from tasks.merge import MergeResult
from tasks.model import OutOfMemory, load_causal_lm, load_tokenizer, oom_message, planned_peak_gib, resolve_device
from tasks.ppo_math import (clipped_policy_loss, clipped_value_loss, entropy_from_logits, gae, kl_controller,
                            logprobs_from_logits, shaped_rewards, whiten)
from tasks.reward import build_reward
from tasks.rundir import StageResult, staged_dir, write_json
from tasks.sft import TrainingDiverged, lora_config


class PpoResult(StageResult):
    adapter_path: str
    value_head_path: str
    merged_path: str | None = None
    steps: int


class PolicyWithValue(nn.Module):
    """LoRA policy + scalar value head as one module, so DDP syncs every trainable parameter."""

    def __init__(self, lm, temperature: float = 1.0, value_head: bool = True):
        super().__init__()
        self.lm, self.temperature = lm, temperature
        self.v_head = nn.Linear(lm.config.hidden_size, 1, device=lm.device, dtype=torch.float32) if value_head else None
        if self.v_head is not None:  # V=0 at start: early advantages are the plain returns, not a random head's noise
            nn.init.zeros_(self.v_head.weight)
            nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids, attention_mask):
        # Left padding: count positions from the first real token, exactly as generate() does.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=self.v_head is not None, use_cache=False)
        values = self.v_head(out.hidden_states[-1].float()).squeeze(-1) if self.v_head is not None else None
        # The policy PPO optimises is the one that samples: logits at the sampling temperature.
        # (top_k/top_p truncation is not reflected, as in the classic TRL recipe.)
        return out.logits.float() / self.temperature, values


def build_policy(settings: PpoSettings, spec: ModelSpec, merged_path: str, device: str) -> PolicyWithValue:
    from peft import get_peft_model, prepare_model_for_kbit_training
    lm = load_causal_lm(merged_path, spec, device, quantization=settings.quantization)
    if settings.quantization != "none":
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    lm = get_peft_model(lm, lora_config(settings.lora))  # LoRA B starts at 0: step-0 policy == reference
    # Dropout stays off (eval mode) throughout: PPO's ratio and the KL need rollout and update to be the same function.
    return PolicyWithValue(lm, settings.temperature).eval()


def build_queries(path: str | Path | DataResult, tok, settings: PpoSettings, seed: int) -> list[str]:
    """Queries from a dataset JSONL (a DataResult means its train set). Text rows: the opening N tokens,
    N uniform in [query_min_tokens, query_max_tokens] (seeded); instruction rows: the prompt."""
    path = path.train_path if isinstance(path, DataResult) else path
    rng, queries = random.Random(seed), []
    for row in read_jsonl(path):
        if "prompt" in row:
            queries.append(row["prompt"])
            continue
        ids = tok(row["text"], add_special_tokens=False).input_ids
        n = rng.randint(settings.query_min_tokens, settings.query_max_tokens)
        queries.append(tok.decode(ids[:n]).rstrip("\ufffd"))  # drop half a multi-byte character
    queries = [q for q in queries if q.strip()]
    if not queries:
        raise ConfigError(f"ppo: no usable queries in {path}")
    return queries


def eos_token_ids(tok, lm, device) -> torch.Tensor:
    ids = lm.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids]) | {tok.eos_token_id}
    return torch.tensor(sorted(i for i in ids if i is not None), device=device)


def response_mask(response: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it: generate() pads finished rows (pad may equal EOS)."""
    is_eos = torch.isin(response, eos_ids).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()


@torch.no_grad()
def rollout(policy: PolicyWithValue, tok, queries: list[str], settings: PpoSettings, length: int,
            eos_ids: torch.Tensor) -> dict:
    """Sample a response of at most `length` new tokens per query; stops early at EOS (no min length)."""
    enc = tok(queries, return_tensors="pt", padding=True).to(eos_ids.device)  # padding_side is left
    out = policy.lm.generate(**enc, do_sample=True, top_k=settings.top_k, top_p=settings.top_p,
                             temperature=settings.temperature, max_new_tokens=length, min_new_tokens=0,
                             pad_token_id=tok.pad_token_id)
    response = out[:, enc.input_ids.shape[1]:]
    return {"query": enc.input_ids, "query_mask": enc.attention_mask,
            "response": response, "response_mask": response_mask(response, eos_ids)}


def forward(model, batch: dict, idx=slice(None)):
    """Log-probs, values and logits at the response positions (position t predicts response token t)."""
    ids = torch.cat([batch["query"], batch["response"]], 1)[idx]
    attn = torch.cat([batch["query_mask"], batch["response_mask"]], 1)[idx]
    logits, values = model(ids, attn)
    start = batch["query"].shape[1] - 1
    logits = logits[:, start:-1]
    values = values[:, start:-1] if values is not None else None
    return logprobs_from_logits(logits, batch["response"][idx]), values, logits


def score(reward_fn, tok, batch: dict) -> torch.Tensor:
    """The reward judges what a reader sees: query + response, decoded without special tokens."""
    texts = [tok.decode(torch.cat([q[qm.bool()], r[rm.bool()]]), skip_special_tokens=True)
             for q, qm, r, rm in zip(batch["query"], batch["query_mask"], batch["response"], batch["response_mask"])]
    return torch.tensor(reward_fn(texts), dtype=torch.float32, device=batch["query"].device)


@torch.no_grad()
def advantages(policy: PolicyWithValue, batch: dict, scores: torch.Tensor, settings: PpoSettings,
               kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Old log-probs and values, reference log-probs, KL-shaped rewards, GAE. Returns (per-sequence KL, entropy)."""
    mask = batch["response_mask"].float()
    logprobs, values, logits = forward(policy, batch)
    with policy.lm.disable_adapter():  # the frozen merged model: same weights in memory, LoRA off
        ref_logprobs, _, _ = forward(policy, batch)
    rewards, kl = shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    if settings.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    adv, returns = gae(rewards, values, mask, settings.gamma, settings.lam)
    if mask.sum() > 1:  # whitening needs two values; it keeps the step size independent of reward scale
        adv = whiten(adv, mask)
    batch.update(logprobs=logprobs, values=values, advantages=adv, returns=returns)
    return kl.sum(1), entropy_from_logits(logits, mask)


def update(model, optimizer, accelerator, params, batch: dict, settings: PpoSettings, step: int) -> dict:
    """settings.ppo_epochs passes over shuffled mini-batches of the rollout; clipped policy + value loss."""
    stats = defaultdict(list)
    n = batch["query"].shape[0]
    for _ in range(settings.ppo_epochs):
        for idx in torch.randperm(n).split(settings.mini_batch_size):
            mask = batch["response_mask"][idx].float()
            logprobs, values, _ = forward(model, batch, idx)
            pg_loss, clip_frac, approx_kl = clipped_policy_loss(
                logprobs, batch["logprobs"][idx], batch["advantages"][idx], mask, settings.clip_range)
            vf_loss, _ = clipped_value_loss(values, batch["values"][idx], batch["returns"][idx], mask,
                                            settings.clip_range_value)
            loss = pg_loss + settings.vf_coef * vf_loss
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"ppo: loss became {loss.item()} at step {step}; "
                                       "lower learning_rate or check the reward")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            for k, v in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("clip_fraction", clip_frac)):
                stats[k].append(v.item())
            approx_kl = accelerator.reduce(approx_kl.detach(), "mean").item()  # all ranks stop together
            stats["approx_kl"].append(approx_kl)
            if settings.early_stop_kl is not None and approx_kl > settings.early_stop_kl:
                return means(stats)  # the policy left the trust region: stop this step's epochs
    return means(stats)


def means(stats: dict) -> dict:
    return {k: sum(v) / len(v) for k, v in stats.items()}


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(root: Path, step: int, policy: PolicyWithValue, optimizer, kl_coef: float, log: list) -> None:
    """Everything a resumed run needs, written to a temp folder and renamed; keeps the last two."""
    tmp = root / f".step-{step}.tmp-{os.getpid()}"
    save_policy(policy, tmp)
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp / "state.pt")
    write_json(tmp / "trainer.json", {"step": step, "kl_coef": kl_coef, "log": log})
    final = root / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(root)[:-2]:
        shutil.rmtree(old)


def save_policy(policy: PolicyWithValue, folder: Path) -> None:
    policy.lm.save_pretrained(folder / "adapter", safe_serialization=True)
    save_file(policy.v_head.state_dict(), folder / "value_head.safetensors")


def checkpoints(root: Path) -> list[Path]:
    found = [p for p in root.glob("step-*") if (p / "trainer.json").exists()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(path: Path, policy: PolicyWithValue, optimizer, kl_ctl) -> tuple[int, list]:
    from peft import set_peft_model_state_dict
    set_peft_model_state_dict(policy.lm, load_file(path / "adapter" / "adapter_model.safetensors"))
    policy.v_head.load_state_dict(load_file(path / "value_head.safetensors"))
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    meta = json.loads((path / "trainer.json").read_text())
    kl_ctl.value = meta["kl_coef"]
    return meta["step"], meta["log"]


# ---------------------------------------------------------------- the stage


def run(settings: PpoSettings, spec: ModelSpec, merge: MergeResult, data: DataResult, out_dir: str | Path, *,
        device: str = "auto", seed: int = 42, checkpoint_dir: str | Path | None = None) -> PpoResult:
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import set_seed
    t0 = time.time()
    device = resolve_device(device)
    # device_placement=False: the model is already where load_causal_lm put it (bnb models must not move).
    accelerator = Accelerator(cpu=device == "cpu", device_placement=False)
    rank = accelerator.process_index
    set_seed(seed + rank)  # each process samples differently; rank 0 == a plain single-process run
    out = Path(out_dir)
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else out.with_name(f".{out.name}.checkpoints")

    tok = load_tokenizer(merge.merged_path, spec.trust_remote_code)
    tok.padding_side = "left"  # prompts end where generation starts
    policy = build_policy(settings, spec, merge.merged_path, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
    kl_ctl = kl_controller(settings.init_kl_coef, settings.target_kl, settings.kl_horizon)
    resumed = (checkpoints(ckpt_root) or [None])[-1]
    start, log = load_checkpoint(resumed, policy, optimizer, kl_ctl) if resumed else (0, [])
    model, optimizer = accelerator.prepare(policy, optimizer)
    reward_fn = build_reward(settings.reward, device)
    queries = build_queries(data.train_path, tok, settings, seed)
    eos_ids = eos_token_ids(tok, policy.lm, policy.v_head.weight.device)

    bar = tqdm(range(start + 1, settings.steps + 1), initial=start, total=settings.steps, desc="ppo",
               disable=not accelerator.is_local_main_process or os.environ.get("TQDM_DISABLE") == "1")
    try:
        for step in bar:
            t_step = time.time()
            rng = random.Random(f"{seed}-{rank}-{step}")  # batch and length depend on the step only: resumable
            batch_queries = [queries[i] for i in rng.sample(range(len(queries)), min(settings.batch_size, len(queries)))]
            length = rng.randint(settings.response_min_tokens, settings.response_max_tokens)
            batch = rollout(policy, tok, batch_queries, settings, length, eos_ids)
            t_rollout = time.time()
            scores = score(reward_fn, tok, batch)
            kl, entropy = advantages(policy, batch, scores, settings, kl_ctl.value)
            t_update = time.time()
            stats = update(model, optimizer, accelerator, params, batch, settings, step)
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
            if accelerator.is_main_process and (step % settings.save_steps == 0 or step == settings.steps):
                save_checkpoint(ckpt_root, step, policy, optimizer, kl_ctl.value, log)
            accelerator.wait_for_everyone()
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemory(oom_message("ppo", settings, planned_peak_gib(out, "ppo"))) from None

    if accelerator.is_main_process:
        with staged_dir(out) as tmp:
            save_policy(policy, tmp)
            tok.save_pretrained(tmp / "adapter")
            write_json(tmp / "ppo_log.json", log)
            if settings.merge_adapter:
                save_merged(merge.merged_path, tmp / "adapter", spec, tmp / "merged")
    accelerator.wait_for_everyone()
    merged_path = str(out / "merged") if settings.merge_adapter else None
    last = log[-3:] or [{"reward_mean": 0.0, "kl": 0.0}]
    metrics = {"reward_final": sum(e["reward_mean"] for e in last) / len(last), "kl": last[-1]["kl"],
               "reward_first": log[0]["reward_mean"] if log else 0.0, "kl_coef": kl_ctl.value, "steps": float(len(log))}
    artifacts = {"adapter": str(out / "adapter"), "value_head": str(out / "value_head.safetensors"),
                 "ppo_log": str(out / "ppo_log.json"), **({"merged": merged_path} if merged_path else {})}
    return PpoResult(stage="ppo", output_dir=str(out), adapter_path=str(out / "adapter"),
                     value_head_path=str(out / "value_head.safetensors"), merged_path=merged_path,
                     steps=len(log), metrics=metrics, artifacts=artifacts, seconds=time.time() - t0,
                     resumed_from_step=start if resumed is not None else None)


def save_merged(merged_path: str, adapter_dir: Path, spec: ModelSpec, dest: Path) -> None:
    """Fold the PPO adapter into an unquantized reload (bitsandbytes layers cannot merge exactly)."""
    from peft import PeftModel
    from transformers import AutoConfig
    dtype = AutoConfig.from_pretrained(merged_path).dtype or torch.float32
    base = load_causal_lm(merged_path, spec, "cpu", quantization="none", dtype=dtype)
    PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().save_pretrained(dest, safe_serialization=True)
    load_tokenizer(merged_path, spec.trust_remote_code).save_pretrained(dest)


@torch.no_grad()
def evaluate_policy(merged_path: str, adapter_path: str, spec: ModelSpec, settings: PpoSettings,
                    queries: list[str], *, device: str = "cpu", seed: int = 0, max_new_tokens: int | None = None) -> dict:
    """Reward of the SFT model vs the PPO policy on the same queries, and the policy's KL from the SFT model.

    Both sides *sample* with the training settings (top_k/top_p/temperature), up to max_new_tokens
    (default response_max_tokens), reseeded identically per batch so they share random numbers. KL is
    sum(logp_policy - logp_sft) over the policy's own samples: an unbiased estimate of KL(policy || SFT).
    One model in memory: the SFT side is the same model under disable_adapter().
    """
    from peft import PeftModel
    device = resolve_device(device)
    tok = load_tokenizer(merged_path, spec.trust_remote_code)
    tok.padding_side = "left"
    lm = PeftModel.from_pretrained(load_causal_lm(merged_path, spec, device, quantization=settings.quantization),
                                   adapter_path)
    policy = PolicyWithValue(lm, settings.temperature, value_head=False).eval()
    reward_fn = build_reward(settings.reward, device)
    eos_ids = eos_token_ids(tok, lm, lm.device)
    length = max_new_tokens or settings.response_max_tokens
    samples, kls = [], []
    for i in range(0, len(queries), settings.batch_size):
        chunk, sides = queries[i:i + settings.batch_size], {}
        for side in ("sft", "ppo"):
            torch.manual_seed(seed + i)
            with lm.disable_adapter() if side == "sft" else nullcontext():
                batch = rollout(policy, tok, chunk, settings, length, eos_ids)
            scores = score(reward_fn, tok, batch)
            texts = [tok.decode(r[m.bool()], skip_special_tokens=True)
                     for r, m in zip(batch["response"], batch["response_mask"])]
            sides[side] = (texts, scores.tolist())
        logprobs, _, _ = forward(policy, batch)  # batch = the policy's own samples
        with lm.disable_adapter():
            ref_logprobs, _, _ = forward(policy, batch)
        kls += ((logprobs - ref_logprobs) * batch["response_mask"]).sum(1).tolist()
        (sft_texts, sft_scores), (ppo_texts, ppo_scores) = sides["sft"], sides["ppo"]
        samples += [{"query": q, "sft": s, "ppo": p, "reward_sft": rs, "reward_ppo": rp}
                    for q, s, p, rs, rp in zip(chunk, sft_texts, ppo_texts, sft_scores, ppo_scores)]
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return {"reward_sft": mean([s["reward_sft"] for s in samples]), "reward_ppo": mean([s["reward_ppo"] for s in samples]),
            "kl_ppo": mean(kls), "samples": samples}
