"""Reward functions for tests/test_ppo.py (imported through RewardSettings(kind="function"))."""


def share_of_e(texts):
    """Share of characters that are the letter 'e': easy for a tiny random model to learn."""
    return [sum(c == "e" for c in t) / max(len(t), 1) for t in texts]


def chars(texts):
    return [len(t) / 40 for t in texts]


def letters(texts):
    return [sum(c.isascii() and c.isalpha() for c in t) / max(len(t), 1) for t in texts]
