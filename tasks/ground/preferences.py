"""Preference pairs: a prompt, a chosen answer and a rejected one, in TRL's two shapes.

`dataset.format: preference` accepts, row by row:
- strings: `prompt`, `chosen`, `rejected` are non-empty text;
- conversations: `chosen` and `rejected` are role/content message lists that each end
  with one assistant message, and `prompt` is a message list too, or absent (an
  implicit prompt: what chosen and rejected share before their answers, as TRL reads it).
Every row comes out in one shape per form, {"prompt", "chosen", "rejected"}, the answers
of a conversation as one assistant message each, so reward_model and dpo read one thing.

Rows are checked here, before any model loads: a pair whose answers are the same
teaches nothing (and a reward model cannot rank it), so it is refused like an empty
answer, naming the file, the row and the column.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from shomin.tasks.ground.conversations import MAX_NAMED, ROLES, _from_list
from shomin.tasks.ground.errors import ConfigError, DataError

COLUMNS = ("prompt", "chosen", "rejected")
ANSWERS = ("chosen", "rejected")


class BadRow(Exception):
    """One problem of one row, without the row number (read_preferences adds it)."""


def _kind(value) -> str:
    """'missing', 'text', 'messages' or 'other': how a cell reads, before it is checked."""
    if value is None or (isinstance(value, float) and value != value):
        return "missing"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "messages"
    return "other"


def _text(value, column: str) -> str:
    kind = _kind(value)
    if kind == "missing":
        raise BadRow(f"column '{column}': missing value")
    if kind != "text":
        raise BadRow(f"column '{column}': expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow(f"column '{column}': empty or whitespace-only")
    return value


def _messages(value, column: str) -> list[dict]:
    """A checked list of {role, content}: known roles, text in every message, system only first."""
    try:
        messages = _from_list(list(value) if isinstance(value, tuple) else value, ("role", "content"), None)
    except TypeError:
        raise BadRow(f"column '{column}': expected a list of role/content messages") from None
    if not messages:
        raise BadRow(f"column '{column}': no messages")
    for n, m in enumerate(messages, 1):
        if m["role"] not in ROLES:
            raise BadRow(f"column '{column}': message {n}: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise BadRow(f"column '{column}': message {n}: empty or whitespace-only content")
        if m["role"] == "system" and n > 1:
            raise BadRow(f"column '{column}': message {n}: a system message can only come first")
    return messages


def _prompt_ends_with_user(prompt: list[dict], where: str) -> None:
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRow(f"{where} must end with a user turn")


def _one_answer(messages: list[dict], column: str) -> dict:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise BadRow(f"column '{column}': expected one assistant message after the prompt, found "
                     f"{', '.join(m['role'] for m in messages)}")
    return messages[0]


def _implicit(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], dict, dict]:
    """The shared start of two conversations as the prompt, and the one answer after it on each side."""
    for column, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise BadRow(f"column '{column}': must end with an assistant message")
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if len(chosen) != shared + 1 or len(rejected) != shared + 1:
        raise BadRow(f"chosen and rejected differ at message {shared + 1}, before their last answer; "
                     "without a `prompt` they must share everything but the final assistant message")
    _prompt_ends_with_user(chosen[:shared], "the prompt chosen and rejected share")
    return chosen[:shared], chosen[-1], rejected[-1]


def _conversation(row: dict) -> dict:
    chosen, rejected = (_messages(row.get(c), c) for c in ANSWERS)
    if _kind(row.get("prompt")) == "missing":
        prompt, best, worse = _implicit(chosen, rejected)
    else:
        if _kind(row.get("prompt")) != "messages":
            raise BadRow("column 'prompt': expected a list of role/content messages, as `chosen` and `rejected` are")
        prompt = _messages(row["prompt"], "prompt")
        _prompt_ends_with_user(prompt, "column 'prompt':")
        best, worse = _one_answer(chosen, "chosen"), _one_answer(rejected, "rejected")
    return {"prompt": prompt, "chosen": [best], "rejected": [worse]}


def read_row(row: dict) -> dict:
    """One row -> {"prompt", "chosen", "rejected"}, or BadRow saying what is wrong."""
    kinds = {c: _kind(row.get(c)) for c in ANSWERS}
    if "messages" in kinds.values():
        for c in ANSWERS:
            if kinds[c] != "messages":
                raise BadRow(f"column '{c}': expected a list of role/content messages, as the other answer is")
        pair = _conversation(row)
        texts = [pair[c][0]["content"] for c in ANSWERS]
    else:
        pair = {c: _text(row.get(c), c) for c in COLUMNS}
        texts = [pair[c] for c in ANSWERS]
    if texts[0].strip() == texts[1].strip():
        raise BadRow("chosen and rejected are the same answer")
    return pair


def _check_columns(df: pd.DataFrame, allow_extra_columns: bool, label: str) -> None:
    columns = set(map(str, df.columns))
    for needed in ANSWERS:
        if needed not in columns:
            raise DataError(f"{label}: missing column '{needed}' (format preference needs prompt, chosen and rejected)")
    if "prompt" not in columns and len(df) and _kind(df["chosen"].iloc[0]) != "messages":
        raise DataError(f"{label}: missing column 'prompt' (only message-list answers can leave the prompt implicit)")
    extra = sorted(columns - set(COLUMNS))
    if extra and not allow_extra_columns:
        raise DataError(f"{label}: unexpected column '{extra[0]}' for preference rows "
                        "(set dataset.allow_extra_columns: true to ignore it)")


def read_preferences(df: pd.DataFrame, allow_extra_columns: bool, label: str) -> list[dict]:
    """Every row as a checked pair; a DataError naming the first few bad rows otherwise."""
    _check_columns(df, allow_extra_columns, label)
    found, bad = [], []
    for n, row in enumerate(df.to_dict("records"), 1):
        try:
            found.append(read_row(row))
        except BadRow as e:
            bad.append(f"row {n}: {e}")
    if bad:
        more = len(bad) - MAX_NAMED
        raise DataError(f"{label}: " + "; ".join(bad[:MAX_NAMED]) + (f" (+{more} more)" if more > 0 else ""))
    return found


def require_preference_data(pipeline, stage: str) -> None:
    """Stages that learn from pairs (reward_model, dpo) refuse any other dataset format up front."""
    fmt = pipeline.dataset.format if pipeline.dataset is not None else None
    if fmt != "preference":
        raise ConfigError(f"dataset.format: stage {stage} trains on preference pairs (prompt, chosen, rejected) but "
                          f"the dataset is {fmt or 'missing'}; set dataset.format: preference")
