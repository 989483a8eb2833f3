"""Reward functions imported by tests/test_reward.py through kind: function specs."""

NOT_CALLABLE = 42


def text_length(texts):
    return [float(len(t)) for t in texts]


def one_short(texts):
    return [1.0] * (len(texts) - 1)


def with_nan(texts):
    return [float("nan")] * len(texts)
