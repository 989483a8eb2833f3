"""Conversations in the shapes people bring, as one shape: a list of {role, content}.

`dataset.format: chat` accepts three row shapes, told apart by their columns:
- `messages`: the OpenAI shape, [{"role": "user", "content": "..."}, ...];
- `conversations`: ShareGPT, [{"from": "human", "value": "..."}, ...] (human/gpt/system,
  also user/assistant), with an optional per-row `system` column;
- `instruction` / `input` / `output`: one user turn and one assistant answer.
A pipeline's `dataset.system` is put first where a conversation has no system message.

Every row is checked here, before any model loads, and a bad one is named by its
row and message number. No tokenizer is needed: rendering with the model's chat
template happens where the tokenizer is (tasks/models/chat.py).
"""
from __future__ import annotations

import pandas as pd
from shomin.tasks.ground.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
SHAPES = {"messages": ("messages", ("role", "content")),
          "conversations": ("conversations", ("from", "value")),
          "instruction": ("instruction", ())}
MAX_NAMED = 3   # problems named in one line; the rest are counted


def shape_of(columns, label: str) -> str:
    """Which of the three shapes a table is in (its first matching column wins)."""
    for shape, (column, _) in SHAPES.items():
        if column in columns:
            return shape
    raise DataError(f"{label}: format chat needs a `messages` column (role/content), a `conversations` column "
                    f"(ShareGPT from/value) or instruction/output columns; found {', '.join(map(str, columns)) or 'none'}")


def columns_of(shape: str) -> set[str]:
    """The columns a shape reads; any other column is extra (refused unless allow_extra_columns)."""
    return {"messages": {"messages"}, "conversations": {"conversations", "system"},
            "instruction": {"instruction", "input", "output", "system"}}[shape]


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _from_instruction(row: dict) -> list[dict]:
    instruction, extra = _text(row.get("instruction")) or "", _text(row.get("input")) or ""
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row.get("output")) or ""}]


def _from_list(value, keys: tuple[str, str], roles: dict[str, str] | None) -> list[dict]:
    """role/content (or from/value) dicts -> role/content; a malformed entry is kept malformed
    (role None) so `problems` can name it."""
    if hasattr(value, "tolist"):     # parquet and hub sets hand numpy arrays of dicts
        value = value.tolist()
    if not isinstance(value, list):
        raise TypeError
    out = []
    for m in value:
        if not isinstance(m, dict):
            raise TypeError
        role, content = m.get(keys[0]), m.get(keys[1])
        role = roles.get(role, role) if roles and isinstance(role, str) else role
        out.append({"role": role, "content": content})
    return out


def problems(messages: list[dict]) -> str | None:
    """What is wrong with one conversation, or None."""
    for n, m in enumerate(messages, 1):
        if m["role"] not in ROLES:
            return f"message {n}: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})"
        if not isinstance(m["content"], str) or not m["content"].strip():
            return f"message {n}: empty content"
        if m["role"] == "system" and n > 1:
            return f"message {n}: a system message can only come first"
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if "assistant" not in turns:
        return "no assistant turn"
    if turns[0] != "user":
        return "starts with an assistant turn; the first turn must be the user's"
    return None


def to_messages(row: dict, shape: str, system: str | None) -> list[dict]:
    """One row -> [{role, content}] in order, the system prompt first when there is one."""
    if shape == "instruction":
        messages = _from_instruction(row)
    else:
        keys = SHAPES[shape][1]
        messages = _from_list(row.get(SHAPES[shape][0]), keys, SHAREGPT_ROLES if shape == "conversations" else None)
    row_system = _text(row.get("system")) if shape != "messages" else None
    prompt = row_system if row_system and row_system.strip() else system
    if prompt and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": prompt}] + messages
    return messages


def read_conversations(df: pd.DataFrame, system: str | None, allow_extra: bool, label: str) -> list[list[dict]]:
    """Every row as a checked conversation; a DataError naming the first few bad rows otherwise."""
    shape = shape_of(list(df.columns), label)
    extra = sorted(set(map(str, df.columns)) - columns_of(shape))
    if extra and not allow_extra:
        raise DataError(f"{label}: unexpected column '{extra[0]}' for chat rows in the `{shape}` shape "
                        "(set dataset.allow_extra_columns: true to ignore it)")
    found, bad = [], []
    for n, row in enumerate(df.to_dict("records"), 1):
        try:
            messages = to_messages(row, shape, system)
        except TypeError:
            keys = "/".join(SHAPES[shape][1])
            bad.append(f"row {n}: `{SHAPES[shape][0]}` is not a list of {keys} objects")
            continue
        why = problems(messages)
        if why:
            bad.append(f"row {n}: {why}")
        else:
            found.append(messages)
    if bad:
        more = len(bad) - MAX_NAMED
        raise DataError(f"{label}: " + "; ".join(bad[:MAX_NAMED]) + (f" (+{more} more)" if more > 0 else ""))
    return found


def last_exchange(messages: list[dict]) -> tuple[list[dict], str]:
    """The conversation up to its last assistant turn, and that turn's text: what a model is
    asked, and what the data answered."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
