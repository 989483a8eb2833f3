"""The evaluation statistics, checked against values worked out by hand."""
from __future__ import annotations

import math
import random

import pytest

from shomin.tasks.models import stats

pytestmark = pytest.mark.unit


def test_mean_se_by_hand():
    # mean 2.5; sample variance of 1,2,3,4 = 5/3; se = sqrt(5/3 / 4)
    m, se = stats.mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and se == pytest.approx(math.sqrt(5 / 12))
    assert math.isnan(stats.mean_se([1.0])[1]) and stats.mean_se([1.0])[0] == 1.0


def test_paired_cancels_what_both_sides_share():
    a = [0.1, 0.5, -0.3, 0.9]
    b = [x + 0.2 for x in a]               # the same units, a constant gain
    gain, se = stats.paired(a, b)
    assert gain == pytest.approx(0.2) and se == pytest.approx(0.0, abs=1e-12)
    assert stats.paired(a, a) == (0.0, 0.0)  # a policy equal to its reference: exactly zero
    with pytest.raises(ValueError):
        stats.paired(a, b[:2])


def test_ratio_is_token_weighted_with_a_delta_method_error():
    # rows: (loss sum, tokens) = (2, 1), (6, 3), (8, 2): ratio = 16/6
    r, se = stats.ratio([2.0, 6.0, 8.0], [1.0, 3.0, 2.0])
    assert r == pytest.approx(16 / 6)
    resid = (2 - r * 1) ** 2 + (6 - r * 3) ** 2 + (8 - r * 2) ** 2
    assert se == pytest.approx(math.sqrt(resid / (3 * 2)) / 2.0)
    change, _ = stats.paired_ratio([2.0, 6.0], [1.0, 3.0], [1.0, 3.0])
    assert change == pytest.approx(-4 / 4)


def test_standard_error_shrinks_as_samples_per_unit_grow():
    """Units whose value is the mean of K noisy samples: the error falls like 1/sqrt(K)."""
    rng = random.Random(0)
    truth = [rng.gauss(0, 0.1) for _ in range(40)]

    def se_with(k: int) -> float:
        units = [t + sum(rng.gauss(0, 1) for _ in range(k)) / k for t in truth]
        return stats.mean_se(units)[1]
    s1, s16 = se_with(1), se_with(16)
    assert s16 < s1 / 2.5


def test_within_noise():
    assert stats.within_noise(0.30, 0.05, 0.36, 0.05) is True
    assert stats.within_noise(0.30, 0.01, 0.36, 0.01) is False
    assert stats.within_noise(0.30, float("nan"), 0.36, 0.01) is None


def test_evaluate_reports_the_loss_with_error_bars_and_refuses_a_loss_over_no_tokens():
    from shomin.tasks.ground.errors import ConfigError
    from shomin.tasks.stages.evaluate import loss_report
    before, after = ([4.0, 6.0, 9.0], [2, 2, 3]), ([3.0, 5.0, 6.0], [2, 2, 3])
    r = loss_report(before, after, 64)
    assert r["loss_before"] == pytest.approx(19 / 7) and r["loss_after"] == pytest.approx(14 / 7)
    assert r["loss_change"] == pytest.approx(-5 / 7) and r["loss_change_se"] > 0 and r["n_eval_rows"] == 3
    with pytest.raises(ConfigError, match="max_seq_length: no held-out row keeps a scored token within 48"):
        loss_report(([0.0, 0.0], [0, 0]), None, 48)
