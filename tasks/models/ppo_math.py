"""Pure tensor math for PPO-based RLHF of causal language models.

This is the classic recipe of Ziegler et al. (2019), "Fine-Tuning Language
Models from Human Preferences": the policy is rewarded by a scalar score at the
end of each response, penalised per token by its KL divergence from a frozen
reference model, and optimised with PPO's clipped surrogate objective using
generalised advantage estimation (GAE). The KL coefficient is adapted so that
the measured KL tracks a target.

Everything here is model-free tensor arithmetic so it can be unit-tested on
hand-computed numbers. Shapes: ``(B, T)`` is batch by response length; ``mask``
is 1.0 on real response tokens and 0.0 on the padding after a response ends,
and every reduction ignores the masked positions.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

Tensor = torch.Tensor

_WHITEN_EPS = 1e-8


# ---------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1.

    Padding must not dilute batch statistics: a plain ``x.mean()`` would count
    the zeros after short responses. Fully masked rows (with ``dim``) give 0
    instead of NaN.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim).clamp_min(1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the masked positions (a scalar).

    ``unbiased`` applies Bessel's correction n/(n-1), where n is the number of
    real tokens, so whitening agrees with ``torch.var`` on the unpadded values.
    """
    mask = mask.to(x.dtype)
    n = mask.sum()
    if n < 1 or (unbiased and n < 2):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} unmasked values, got {int(n)}")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        var = var * n / (n - 1)
    return var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise ``x`` to zero mean / unit variance over the masked positions.

    Whitening advantages keeps the policy-gradient step size independent of
    the reward scale. With ``shift_mean=False`` the mean is added back, which
    rescales without re-centring (used for rewards, whose sign matters).
    Masked positions are set to 0 so they carry no spurious signal.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + _WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ---------------------------------------------------------------------------
# KL penalty and reward shaping
# ---------------------------------------------------------------------------


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token logprobs.

    ``k1`` (logp - ref_logp) is the unbiased single-sample estimator used by
    Ziegler et al.; it can be negative per token. ``abs`` and ``mse``
    (0.5 * d**2) are non-negative alternatives with lower variance.
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "mse":
        return 0.5 * d * d
    raise ValueError(f"unknown KL estimator kind {kind!r}; expected 'k1', 'abs' or 'mse'")


def _last_token_index(mask: Tensor) -> Tensor:
    """Index of the last unmasked position of each row (rows must be non-empty).

    Computed as argmax of position * mask so it does not assume how many
    real tokens precede it.
    """
    if bool((mask.sum(dim=1) <= 0).any()):
        raise ValueError("every row of mask needs at least one real token to receive its score")
    positions = torch.arange(mask.shape[1], device=mask.device, dtype=mask.dtype)
    return (positions * mask).argmax(dim=1)


def shaped_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: Union[float, Tensor],
    kind: str = "k1",
) -> Tuple[Tensor, Tensor]:
    """Per-token rewards: ``-kl_coef * KL`` everywhere plus the score at the end.

    The reward model judges the whole response, so its scalar (shape ``(B,)``)
    is credited to the last real token; the per-token KL penalty keeps the
    policy close to the reference and stops reward hacking. Returns
    ``(rewards, kl)``, both ``(B, T)`` and zero on padding.
    """
    mask = mask.to(logprobs.dtype)
    kl = kl_per_token(logprobs, ref_logprobs, kind) * mask
    rewards = -kl_coef * kl
    last = _last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards = rewards.clone()
    rewards[rows, last] = rewards[rows, last] + scores.to(rewards.dtype)
    return rewards, kl


# ---------------------------------------------------------------------------
# Advantage estimation
# ---------------------------------------------------------------------------


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> Tuple[Tensor, Tensor]:
    """Generalised advantage estimation, run backwards over the T positions.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma*lam*A_{t+1};
    lam trades bias (lam=0, one-step TD) against variance (lam=1, Monte Carlo).
    The episode ends at the last real token, so the value after it is 0;
    rewards/values on padding are zeroed first so they cannot leak backwards.
    Returns ``(advantages, returns)`` with ``returns = advantages + values``
    (the value-head target), detached because both are regression targets.
    """
    mask = mask.to(values.dtype)
    r = rewards * mask
    v = values * mask
    T = r.shape[1]
    next_adv = torch.zeros_like(v[:, 0])
    adv = []
    for t in reversed(range(T)):
        next_value = v[:, t + 1] if t + 1 < T else torch.zeros_like(v[:, t])
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        adv.append(next_adv)
    advantages = torch.stack(adv[::-1], dim=1)
    returns = advantages + v
    return advantages.detach(), returns.detach()


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate loss (to minimise).

    Taking the max of ``-A*ratio`` and ``-A*clip(ratio)`` is the pessimistic
    bound: once the ratio leaves [1-c, 1+c] in the direction that would
    improve the objective, the gradient stops, so one batch cannot push the
    policy far from the one that sampled it. Returns ``(loss, clip_fraction,
    approx_kl)``; the last two are detached diagnostics, approx_kl being
    mean 0.5*(logp - old_logp)**2.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clip_fraction.detach(), approx_kl.detach()


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float,
) -> Tuple[Tensor, Tensor]:
    """Clipped value-head regression loss, 0.5 * mean(max(err, clipped err)).

    Clipping the new value to within ``clip_range_value`` of the rollout value
    and taking the larger error mirrors the policy clip: the value head cannot
    jump far in one update. Returns ``(loss, clip_fraction)``.
    """
    v_clipped = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), mask)
    clip_fraction = masked_mean((err_clipped > err).to(values.dtype), mask)
    return loss, clip_fraction.detach()


# ---------------------------------------------------------------------------
# Logit helpers
# ---------------------------------------------------------------------------


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Masked mean entropy of the per-token distributions, logits ``(B, T, V)``.

    Uses H = logsumexp(z) - sum(softmax(z) * z), which is stable for large
    logits; logged to watch for policy collapse.
    """
    return masked_mean(token_entropy(logits), mask)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of each position's distribution, ``(B, T, V)`` -> ``(B, T)``."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label token: ``(B, T, V)`` logits -> ``(B, T)``.

    log_softmax then gather avoids materialising probabilities and is the
    quantity PPO's importance ratio and the KL penalty are built from.
    """
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------


class AdaptiveKLController:
    """Proportional controller keeping the measured KL near ``target``.

    A fixed coefficient is either too weak early or too strong late; adapting
    it (Ziegler et al. 2019, eq. 2) keeps the policy a steady distance from the
    reference. The error is clipped to +-0.2 so one noisy batch moves the
    coefficient by at most 0.2 * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: Union[float, Tensor], n_steps: int) -> None:
        """Multiply the coefficient by 1 + clip(kl/target - 1, +-0.2) * n_steps / horizon."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


class FixedKLController:
    """Constant KL coefficient with the same interface as the adaptive one."""

    def __init__(self, init_kl_coef: float):
        self.value = float(init_kl_coef)

    def update(self, current_kl: Union[float, Tensor], n_steps: int) -> None:
        """Do nothing: the coefficient is fixed by design."""


def kl_controller(
    init_kl_coef: float, target: Optional[float], horizon: float
) -> Union[AdaptiveKLController, FixedKLController]:
    """Build the adaptive controller, or a fixed one when ``target`` is None."""
    if target is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, target, horizon)
