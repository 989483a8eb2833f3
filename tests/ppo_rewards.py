"""Reward functions for tests/test_ppo.py, loaded through RewardSettings(kind="function")."""


def letters(texts):
    """Share of characters that are ASCII letters: a tiny random model can learn to raise it."""
    return [sum(c.isascii() and c.isalpha() for c in t) / max(len(t), 1) for t in texts]


def huge(texts):
    """Finite but so large that the squared value error overflows: training must stop loudly."""
    return [3e38 for _ in texts]


def response_letters(texts, prompt="The movie was"):
    """Share of ASCII letters in what follows the test's single prompt."""
    return letters([t.removeprefix(prompt) for t in texts])
