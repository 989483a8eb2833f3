"""Held-out preference pairs judged by a tuned policy: does it now prefer the chosen answer?

The policy's implicit reward of an answer (as DPO defines it) is log pi(answer | prompt) -
log pi_ref(answer | prompt), pi_ref being the SFT model. Here pi_ref is the very same weights
with the policy's adapter switched off, so one copy of the model is in memory. A pair counts as
preferred when the chosen answer's implicit reward is above the rejected one's; the margin is
their difference. The same measure serves PPO, GRPO and DPO policies, so they can be compared.
"""
from __future__ import annotations

import torch
from shomin.tasks.ground.settings import ModelSpec
from shomin.tasks.models import chat, stats
from shomin.tasks.models.loading import load_causal_lm, load_tokenizer


def chosen_row(row: dict) -> dict:
    """A preference pair as an SFT row: prompt + chosen answer (a conversation when the pair is one).
    SFT trains on these, and evaluate measures its held-out loss on them."""
    if isinstance(row["chosen"], list):
        return {"messages": row["prompt"] + row["chosen"]}
    return {"prompt": row["prompt"], "completion": row["chosen"]}


def prompt_and_full(tok, row: dict, which: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt, and of the prompt followed by the `which` answer (string or
    conversational pairs, rendered as the trainers render them)."""
    if isinstance(row[which], list):
        prompt = chat.render(tok, row["prompt"], generation_prompt=True)
        full = chat.render(tok, row["prompt"] + row[which])
        return tok(prompt, add_special_tokens=False).input_ids, tok(full, add_special_tokens=False).input_ids
    return (tok(row["prompt"], add_special_tokens=False).input_ids,
            tok(row["prompt"] + row[which], add_special_tokens=False).input_ids)


def answer_logprob(lm, ids: list[int], n_prompt: int, device) -> float:
    """Sum of log-probabilities of the tokens after the first n_prompt."""
    x = torch.tensor([ids], device=device)
    logits = lm(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]
    return logp[max(n_prompt - 1, 0):].sum().item()


@torch.no_grad()
def preference_accuracy(merged_path: str, adapter_path: str, spec: ModelSpec, pairs: list[dict], *,
                        device: str = "cpu", quantization: str = "none") -> dict:
    """pref_accuracy and pref_margin (± standard errors across pairs) of the policy's implicit reward."""
    from peft import PeftModel
    tok = load_tokenizer(merged_path, spec.trust_remote_code)
    lm = PeftModel.from_pretrained(load_causal_lm(merged_path, spec, device, quantization=quantization),
                                   adapter_path).eval()
    margins = []
    for row in pairs:
        implicit = {}
        for which in ("chosen", "rejected"):
            prompt, full = prompt_and_full(tok, row, which)
            policy = answer_logprob(lm, full, len(prompt), lm.device)
            with lm.disable_adapter():
                reference = answer_logprob(lm, full, len(prompt), lm.device)
            implicit[which] = policy - reference
        margins.append(implicit["chosen"] - implicit["rejected"])
    accuracy, accuracy_se = stats.mean_se([float(m > 0) for m in margins])
    margin, margin_se = stats.mean_se(margins)
    return {"pref_accuracy": accuracy, "pref_accuracy_se": accuracy_se, "pref_margin": margin,
            "pref_margin_se": margin_se, "n_pairs": len(margins)}
