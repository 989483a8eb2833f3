"""One PPO step after its rollout and scores, in TRL's classic split: advantages() shapes the
rewards with the KL to the reference and runs GAE (compute_rewards), update() runs the clipped
policy and value losses over shuffled mini-batches for a few epochs (loss, train_minibatch).
The tensor maths is in ppo_math.py; the stage (tasks/stages/ppo.py) drives the loop."""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Protocol

import torch
from shomin.tasks.ground.errors import TrainingDiverged
from shomin.tasks.models.levers import selective_checkpoint
from shomin.tasks.models.levers.cuda_graphs import ReplayedStep
from shomin.tasks.models.levers.data_parallel import mean_gradients
from shomin.tasks.models.loading import checkpointed_in_eval
from shomin.tasks.models.ppo_math import clipped_policy_loss, clipped_value_loss, gae, masked_mean, shaped_rewards, whiten
from shomin.tasks.models.rl import PolicyWithValue, forward, with_reference


class StepSettings(Protocol):
    """What a step reads of the stage's settings (tasks/stages/ppo.py's PpoSettings documents each)."""
    whiten_rewards: bool
    gamma: float
    lam: float
    ppo_epochs: int
    mini_batch_size: int
    clip_range: float
    clip_range_value: float
    vf_coef: float
    max_grad_norm: float
    early_stop_kl: float | None
    cuda_graphs: bool
    gradient_checkpointing: bool | str   # true, false or "selective" (levers/selective_checkpoint.py)


@torch.no_grad()
def advantages(policy: PolicyWithValue, batch: dict, scores: torch.Tensor, settings: StepSettings,
               kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Old log-probs and values, reference log-probs, KL-shaped rewards, GAE. Returns (per-sequence KL, entropy)."""
    mask = batch["response_mask"].float()
    # old and reference log-probs in one pass: the frozen merged model is the same weights, LoRA off
    logprobs, values, entropy, ref_logprobs = with_reference(policy, batch)
    rewards, kl = shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    if settings.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    adv, returns = gae(rewards, values, mask, settings.gamma, settings.lam)
    if mask.sum() > 1:  # whitening needs two values; it keeps the step size independent of reward scale
        adv = whiten(adv, mask)
    batch.update(logprobs=logprobs, values=values, advantages=adv, returns=returns)
    return kl.sum(1), masked_mean(entropy, mask)


def update(policy: PolicyWithValue, optimizer, accelerator, params, batch: dict, settings: StepSettings, step: int) -> dict:
    """settings.ppo_epochs passes over shuffled mini-batches of the rollout; clipped policy + value loss."""
    selective = settings.gradient_checkpointing == "selective"
    with checkpointed_in_eval(policy.lm, settings.gradient_checkpointing is True), \
            (selective_checkpoint.recomputed_attention(policy.lm) if selective else contextlib.nullcontext()):
        return _epochs(policy, optimizer, accelerator, params, batch, settings, step)


def _epochs(policy, optimizer, accelerator, params, batch: dict, settings: StepSettings, step: int) -> dict:
    stats, n = defaultdict(list), batch["query"].shape[0]
    rows = torch.zeros(settings.mini_batch_size, dtype=torch.long, device=batch["query"].device)

    def minibatch() -> tuple:
        """Forward + backward of the mini-batch whose row indices are in `rows` (a fixed tensor,
        so a CUDA graph of this function serves every mini-batch of the step)."""
        mask = batch["response_mask"][rows].float()
        logprobs, values, _ = forward(policy, batch, rows)
        pg_loss, clip_frac, approx_kl = clipped_policy_loss(
            logprobs, batch["logprobs"][rows], batch["advantages"][rows], mask, settings.clip_range)
        vf_loss, _ = clipped_value_loss(values, batch["values"][rows], batch["returns"][rows], mask,
                                        settings.clip_range_value)
        loss = pg_loss + settings.vf_coef * vf_loss
        accelerator.backward(loss)
        return tuple(t.detach() for t in (loss, pg_loss, vf_loss, clip_frac, approx_kl))

    graphed = settings.cuda_graphs and rows.is_cuda
    run = ReplayedStep(minibatch, params) if graphed else minibatch
    try:
        for _ in range(settings.ppo_epochs):
            for idx in torch.randperm(n).split(settings.mini_batch_size):
                rows.copy_(idx)
                loss, pg_loss, vf_loss, clip_frac, approx_kl = run()
                if accelerator.num_processes > 1:
                    mean_gradients(params)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"ppo: loss became {loss.item()} at step {step}; "
                                           "lower learning_rate or check the reward")
                accelerator.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=not graphed)   # a graph rewrites its own gradient buffers
                for k, v in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("clip_fraction", clip_frac)):
                    stats[k].append(v.item())
                approx_kl = accelerator.reduce(approx_kl, "mean").item()  # all ranks stop together
                stats["approx_kl"].append(approx_kl)
                if settings.early_stop_kl is not None and approx_kl > settings.early_stop_kl:
                    return means(stats)  # the policy left the trust region: stop this step's epochs
    finally:
        if graphed:
            run.close()
    return means(stats)


def means(stats: dict) -> dict:
    return {k: sum(v) / len(v) for k, v in stats.items()}
