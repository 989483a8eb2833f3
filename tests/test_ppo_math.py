"""Unit tests for tasks.ppo_math on small hand-computed cases.

Every expected number is derived by hand in the comment beside it; the tests
do not re-run the implementation's formulas.
"""

import math

import pytest
import torch
from shomin.tasks.models.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    kl_controller,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    shaped_rewards,
    whiten,
)


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), t(b) if not torch.is_tensor(b) else b.double(), atol=tol, rtol=0)


# ---------------------------------------------------------------- statistics


def test_masked_mean_ignores_padding():
    x = t([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    # all real: (1+2+3+4)/4 = 2.5 (the 100s would give a much larger mean)
    close(masked_mean(x, mask), 2.5)
    # per row: (1+2+3)/3 = 2 ; 4/1 = 4
    close(masked_mean(x, mask, dim=1), [2.0, 4.0])


def test_masked_var_unbiased_and_biased():
    x = t([[1.0, 2.0, 3.0, 100.0]])
    mask = t([[1, 1, 1, 0]])
    # mean 2, squared deviations 1,0,1 -> sum 2; unbiased 2/2 = 1, biased 2/3
    close(masked_var(x, mask, unbiased=True), 1.0)
    close(masked_var(x, mask, unbiased=False), 2.0 / 3.0)


def test_masked_var_unbiased_needs_two_values():
    with pytest.raises(ValueError):
        masked_var(t([[5.0, 1.0]]), t([[1, 0]]), unbiased=True)


def test_whiten_zero_mean_unit_var_on_masked_part():
    x = t([[2.0, 4.0], [6.0, 1000.0]])
    mask = t([[1, 1], [1, 0]])
    # real values 2,4,6: mean 4, unbiased var (4+0+4)/2 = 4, std 2 -> -1, 0, 1
    w = whiten(x, mask)
    close(w, [[-1.0, 0.0], [1.0, 0.0]])
    close(masked_mean(w, mask), 0.0)
    close(masked_var(w, mask), 1.0)


def test_whiten_without_shift_keeps_mean():
    x = t([[2.0, 4.0, 6.0, -50.0]])
    mask = t([[1, 1, 1, 0]])
    # (x - 4) / 2 + 4 -> 3, 4, 5 ; padded position is zeroed
    close(whiten(x, mask, shift_mean=False), [[3.0, 4.0, 5.0, 0.0]])


# ------------------------------------------------------- KL / reward shaping


def test_kl_per_token_kinds():
    logp = t([0.0, -1.0])
    ref = t([-0.5, -0.2])
    # d = logp - ref = [0.5, -0.8]
    close(kl_per_token(logp, ref), [0.5, -0.8])
    close(kl_per_token(logp, ref, "k1"), [0.5, -0.8])
    close(kl_per_token(logp, ref, "abs"), [0.5, 0.8])
    # 0.5 * d^2 = [0.125, 0.32]
    close(kl_per_token(logp, ref, "mse"), [0.125, 0.32])
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "full")


def test_shaped_rewards_places_score_at_last_real_token():
    scores = t([1.0, -2.0])
    logp = t([[-1.0, -1.0, -1.0], [-0.5, -0.5, -9.0]])
    ref = t([[-1.5, -1.0, -0.5], [-1.0, -1.0, 0.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    rewards, kl = shaped_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # kl row0 = [0.5, 0, -0.5]; row1 = [0.5, 0.5, masked -> 0]
    close(kl, [[0.5, 0.0, -0.5], [0.5, 0.5, 0.0]])
    # -0.1*kl, plus score at last real token (col 2 for row0, col 1 for row1):
    # row0 = [-0.05, 0, 0.05 + 1] ; row1 = [-0.05, -0.05 - 2, 0]
    close(rewards, [[-0.05, 0.0, 1.05], [-0.05, -2.05, 0.0]])


def test_shaped_rewards_rejects_empty_response():
    with pytest.raises(ValueError):
        shaped_rewards(t([1.0]), t([[0.0, 0.0]]), t([[0.0, 0.0]]), t([[0, 0]]), 0.1)


# ---------------------------------------------------------------------- GAE


def test_gae_single_row_gamma_one():
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.5, 0.6, 0.7]])
    mask = t([[1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # t=2: delta = 1 + 0 (terminal) - 0.7 = 0.3            A2 = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1; A1 = 0.1 + 0.95*0.3 = 0.385
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1; A0 = 0.1 + 0.95*0.385 = 0.46575
    close(adv, [[0.46575, 0.385, 0.3]])
    # returns = A + V = [0.96575, 0.985, 1.0]
    close(ret, [[0.96575, 0.985, 1.0]])


def test_gae_discount_and_lambda_enter_separately():
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.5, 0.6, 0.7]])
    mask = t([[1, 1, 1]])
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # gamma*lam = 0.45
    # t=2: delta = 1 - 0.7 = 0.3                          A2 = 0.3
    # t=1: delta = 0.9*0.7 - 0.6 = 0.03; A1 = 0.03 + 0.45*0.3 = 0.165
    # t=0: delta = 0.9*0.6 - 0.5 = 0.04; A0 = 0.04 + 0.45*0.165 = 0.11425
    close(adv, [[0.11425, 0.165, 0.3]])


def test_gae_padding_is_ignored():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = t([[0.5, 0.6, 0.7], [0.5, 1.0, 50.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0 as in the single-row test
    close(adv[0], [0.46575, 0.385, 0.3])
    # row 1 ends at t=1, so the value after it is 0 (not the padded 50):
    # t=1: delta = 2 + 0 - 1.0 = 1.0                       A1 = 1.0
    # t=0: delta = 0 + 1.0 - 0.5 = 0.5; A0 = 0.5 + 0.95*1.0 = 1.45
    # t=2 is padding -> 0 (the padded 99 / 50 must not leak)
    close(adv[1], [1.45, 1.0, 0.0])
    # returns on real tokens: 1.45 + 0.5 = 1.95, 1.0 + 1.0 = 2.0
    close(ret[1, :2], [1.95, 2.0])


# ------------------------------------------------------------ policy loss


R15, R05, R11 = math.log(1.5), math.log(0.5), math.log(1.1)


def _policy(ratio_log, adv, clip=0.2):
    old = t([[0.0]])
    return clipped_policy_loss(t([[ratio_log]]), old, t([[adv]]), t([[1.0]]), clip)


@pytest.mark.parametrize(
    "log_ratio, adv, exp_loss, exp_clip",
    [
        # A=+1, ratio 1.5: -1.5 vs -1*1.2=-1.2 -> max -1.2 (clipped)
        (R15, 1.0, -1.2, 1.0),
        # A=+1, ratio 0.5: -0.5 vs -0.8 -> max -0.5 (unclipped; pessimistic bound)
        (R05, 1.0, -0.5, 0.0),
        # A=-1, ratio 1.5: 1.5 vs 1.2 -> max 1.5 (unclipped)
        (R15, -1.0, 1.5, 0.0),
        # A=-1, ratio 0.5: 0.5 vs 0.8 -> max 0.8 (clipped)
        (R05, -1.0, 0.8, 1.0),
        # A=+2, ratio 1.1 inside [0.8, 1.2]: both -2.2, not counted as clipped
        (R11, 2.0, -2.2, 0.0),
    ],
)
def test_clipped_policy_loss_regimes(log_ratio, adv, exp_loss, exp_clip):
    loss, clip_frac, approx_kl = _policy(log_ratio, adv)
    close(loss, exp_loss)
    close(clip_frac, exp_clip)
    close(approx_kl, 0.5 * log_ratio**2)


def test_clipped_policy_loss_gradient_stops_only_when_clipped():
    # clipped branch (A=+1, ratio 1.5): loss = -1.2 constant in logp -> grad 0
    logp = t([[R15]]).requires_grad_()
    loss, _, _ = clipped_policy_loss(logp, t([[0.0]]), t([[1.0]]), t([[1.0]]), 0.2)
    loss.backward()
    close(logp.grad, [[0.0]])
    # unclipped branch (A=+1, ratio 0.5): loss = -exp(logp) -> grad -0.5
    logp = t([[R05]]).requires_grad_()
    loss, _, _ = clipped_policy_loss(logp, t([[0.0]]), t([[1.0]]), t([[1.0]]), 0.2)
    loss.backward()
    close(logp.grad, [[-0.5]])


def test_clipped_policy_loss_batch_with_padding():
    # the five cases above in one row plus a padded 6th position with a huge ratio/advantage
    logp = t([[R15, R05, R15, R05, R11, math.log(10.0)]])
    old = torch.zeros_like(logp)
    adv = t([[1.0, 1.0, -1.0, -1.0, 2.0, 100.0]])
    mask = t([[1, 1, 1, 1, 1, 0]])
    loss, clip_frac, approx_kl = clipped_policy_loss(logp, old, adv, mask, 0.2)
    # loss = (-1.2 - 0.5 + 1.5 + 0.8 - 2.2) / 5 = -1.6 / 5 = -0.32
    close(loss, -0.32)
    # clipped cases: 1st and 4th -> 2/5
    close(clip_frac, 0.4)
    # approx_kl = mean 0.5*logr^2 = (2*0.5*ln1.5^2 + 2*0.5*ln0.5^2 + 0.5*ln1.1^2)/5
    #           = (0.164402 + 0.480453 + 0.004542)/5 = 0.129880
    close(approx_kl, 0.129880, tol=1e-5)


# ------------------------------------------------------------- value loss


def test_clipped_value_loss():
    old = t([[1.0, 1.0, 1.0, 1.0, 0.0]])
    values = t([[1.5, 1.1, 0.5, 1.5, 9.0]])
    returns = t([[2.0, 0.0, 0.0, 0.0, -9.0]])
    mask = t([[1, 1, 1, 1, 0]])
    # c=0.2 -> clipped values within [0.8, 1.2]
    # a: v=1.5,R=2: (1.5-2)^2=0.25 vs (1.2-2)^2=0.64 -> 0.64 (clipped)
    # b: v=1.1,R=0: 1.21 vs 1.21 (inside range)      -> 1.21
    # c: v=0.5,R=0: 0.25 vs (0.8)^2=0.64             -> 0.64 (clipped)
    # d: v=1.5,R=0: 2.25 vs (1.2)^2=1.44             -> 2.25
    # loss = 0.5 * (0.64+1.21+0.64+2.25)/4 = 0.5 * 1.185 = 0.5925 ; clip frac 2/4
    loss, clip_frac = clipped_value_loss(values, old, returns, mask, 0.2)
    close(loss, 0.5925)
    close(clip_frac, 0.5)


# ---------------------------------------------------------- logit helpers


def test_entropy_uniform_is_log_vocab_and_padding_ignored():
    logits = torch.zeros(1, 3, 4, dtype=torch.float64)
    logits[0, 2] = t([100.0, 0.0, 0.0, 0.0])  # near one-hot, entropy ~0, but padded
    mask = t([[1, 1, 0]])
    # uniform over V=4 -> log 4 = 1.386294
    close(entropy_from_logits(logits, mask), math.log(4))


def test_entropy_two_class():
    # logits [0, ln 3] -> p = [0.25, 0.75]
    # H = 0.25*ln4 + 0.75*ln(4/3) = 0.346574 + 0.215762 = 0.562335
    logits = t([[[0.0, math.log(3.0)]]])
    close(entropy_from_logits(logits, t([[1.0]])), 0.562335, tol=1e-6)


def test_logprobs_from_logits():
    logits = t([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 0]])
    # logsumexp(1,2,3) = 3 + ln(1 + e^-1 + e^-2) = 3.407606 -> 3 - 3.407606 = -0.407606
    # uniform over 3 -> -ln 3 = -1.098612
    out = logprobs_from_logits(logits, labels)
    assert out.shape == (1, 2)
    close(out, [[-0.407606, -1.098612]], tol=1e-6)
    # and against a manual softmax: log(exp(z_y) / sum exp(z))
    manual = torch.log(torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True))
    close(out, manual[0, [0, 1], [2, 0]].unsqueeze(0))


# ------------------------------------------------------------ controllers


@pytest.mark.parametrize(
    "kl, expected",
    [
        # err = 6.6/6 - 1 = +0.1 -> mult = 1 + 0.1*256/10000 = 1.00256 -> 0.200512
        (6.6, 0.200512),
        # err = 100/6 - 1 = 15.7 clipped to +0.2 -> mult 1.00512 -> 0.201024
        (100.0, 0.201024),
        # err = 5.4/6 - 1 = -0.1 -> mult 0.99744 -> 0.199488
        (5.4, 0.199488),
        # err = 3/6 - 1 = -0.5 clipped to -0.2 -> mult 0.99488 -> 0.198976
        (3.0, 0.198976),
        # on target: unchanged
        (6.0, 0.2),
    ],
)
def test_adaptive_kl_update(kl, expected):
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(kl, n_steps=256)
    assert ctl.value == pytest.approx(expected, abs=1e-12)


def test_adaptive_kl_update_accepts_tensor_and_compounds():
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(torch.tensor(6.6), 256)
    ctl.update(6.6, 256)
    # 0.2 * 1.00256^2 = 0.2 * 1.0051265536 = 0.20102531072
    # (float32 tensor(6.6) is off by ~1e-7, hence the looser tolerance)
    assert ctl.value == pytest.approx(0.20102531072, abs=1e-9)


def test_fixed_kl_and_factory():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05
    assert isinstance(kl_controller(0.05, None, 10000), FixedKLController)
    adaptive = kl_controller(0.05, 6.0, 10000)
    assert isinstance(adaptive, AdaptiveKLController)
    assert adaptive.value == 0.05
