"""The reward a reward_model stage trained, as a function of texts (reward kind `trained`).

A reward model only means what it learnt if it sees a text the way training showed it.
TRL's RewardTrainer, for string rows, concatenates prompt and answer, appends the EOS
token when the answer lacks one, tokenizes with the tokenizer's own special tokens and
right-pads; the model reads its score at the rightmost token that is not padding. Here
`token_ids` is that one path: the stage tokenizes its training pairs with it (TRL then
skips its own processing) and every later scoring goes through it too. Conversations are
first rendered to one string with the chat template (`pair_texts`), so they take the
same path. Right padding, because the model's position ids count from the first column:
left padding would shift every position and change the score.

The stage writes `reward_model.json` beside the adapter: the base (the merged SFT
model), whether its code may run, and the training max_length.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from shomin.tasks.models.loading import MODEL_CREATION, load_tokenizer, resolve_dtype
from shomin.tasks.models.stats import mean_se

RewardFn = Callable[[list[str]], list[float]]
RECORD = "reward_model.json"


def token_ids(tok, text: str, max_length: int | None = None) -> list[int]:
    """Ids as TRL trains on them: EOS appended unless the text ends with it. Past max_length
    the *last* tokens are kept: the score is read at the end."""
    if tok.eos_token and not text.endswith(tok.eos_token):
        text += tok.eos_token
    ids = tok(text)["input_ids"]
    return ids[-max_length:] if max_length else ids


def pair_texts(tok, row: dict) -> tuple[str, str]:
    """(chosen, rejected) as the text the reward sees: prompt followed by the answer; a
    conversational pair (message lists) rendered whole with the chat template, its leading
    BOS dropped where the tokenizer adds one itself (else it would appear twice)."""
    prompt = row.get("prompt", "")
    if not isinstance(row["chosen"], list):
        return prompt + row["chosen"], prompt + row["rejected"]
    texts = [tok.apply_chat_template((prompt or []) + row[k], tokenize=False) for k in ("chosen", "rejected")]
    bos = tok.bos_token
    if bos and tok("")["input_ids"][:1] == [tok.bos_token_id]:
        texts = [t[len(bos):] if t.startswith(bos) else t for t in texts]
    return texts[0], texts[1]


def scorer(model, tok, batch_size: int = 16, max_length: int | None = None) -> RewardFn:
    """Score texts with a live sequence-classification model (eval mode and no grad for the
    call; the model's mode is restored after, so a trainer's model can be scored mid-run)."""
    device = next(model.parameters()).device

    def score(texts: list[str]) -> list[float]:
        was_training, out = model.training, []
        model.eval()
        try:
            for i in range(0, len(texts), batch_size):
                ids = [token_ids(tok, t, max_length) for t in texts[i:i + batch_size]]
                batch = tok.pad({"input_ids": ids}, padding=True, return_tensors="pt", padding_side="right")
                with torch.no_grad():
                    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
                out.extend(logits[:, 0].float().tolist())
        finally:
            model.train(was_training)
        return out
    return score


def read_record(model_path: str | Path) -> dict:
    """What the stage recorded beside the adapter; a bare PEFT folder falls back to its config."""
    folder = Path(model_path)
    if (folder / RECORD).exists():
        return json.loads((folder / RECORD).read_text(encoding="utf-8"))
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    return {"base_path": config["base_model_name_or_path"], "trust_remote_code": False, "max_length": None}


def load_reward_model(model_path: str | Path, device: str = "cpu"):
    """(model, tokenizer, record): the base with num_labels=1, the adapter and its score head on
    top. pad_token_id is set from the tokenizer: the model finds the last token by it."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    record = read_record(model_path)
    trust = bool(record.get("trust_remote_code"))
    tok = load_tokenizer(model_path, trust)
    with MODEL_CREATION:
        base = AutoModelForSequenceClassification.from_pretrained(
            record["base_path"], num_labels=1, use_safetensors=True, trust_remote_code=trust,
            dtype=resolve_dtype("auto", device))
    base.config.pad_token_id = tok.pad_token_id
    model = PeftModel.from_pretrained(base, str(model_path)).to(device).eval()
    return model, tok, record


def build_trained_reward(model_path: str, device: str = "cpu", batch_size: int = 16) -> RewardFn:
    """texts -> one float each, from the reward model folder a reward_model stage wrote."""
    model, tok, record = load_reward_model(model_path, device)
    return scorer(model, tok, batch_size, record.get("max_length"))


def score_pairs(reward_fn: RewardFn, rows: list[dict]) -> tuple[list[float], list[float]]:
    """Scores of prompt + chosen and prompt + rejected for string rows, in one batched call."""
    chosen = [r.get("prompt", "") + r["chosen"] for r in rows]
    rejected = [r.get("prompt", "") + r["rejected"] for r in rows]
    scores = reward_fn(chosen + rejected) if rows else []
    return scores[:len(rows)], scores[len(rows):]


def pair_metrics(chosen: list[float], rejected: list[float], suffix: str = "") -> dict[str, float]:
    """accuracy (share of pairs with r(chosen) > r(rejected)) and margin (mean r(chosen) -
    r(rejected)), each with its standard error over pairs: accuracy{suffix}, accuracy{suffix}_se, ..."""
    acc, acc_se = mean_se([float(c > r) for c, r in zip(chosen, rejected)])
    margin, margin_se = mean_se([c - r for c, r in zip(chosen, rejected)])
    return {f"accuracy{suffix}": acc, f"accuracy{suffix}_se": acc_se,
            f"margin{suffix}": margin, f"margin{suffix}_se": margin_se}
