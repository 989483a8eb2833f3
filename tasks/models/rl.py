"""The pieces the policy stages share: a causal LM with an optional value head, queries
from the dataset, rollouts, log-probs at response positions, scoring, and the paired
evaluation of a tuned policy against its reference (the same weights, adapter off).

Sampling settings arrive as any object with the fields of `PolicyRecord`
(tasks/ground/records.py): the PPO stage passes its settings, evaluate passes the
record the PPO stage returned, so both sample exactly the same way.
"""
from __future__ import annotations

import random
from contextlib import nullcontext
from pathlib import Path

import torch
from shomin.tasks.ground.conversations import last_exchange
from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.ground.records import PolicyRecord
from shomin.tasks.ground.rundir import read_jsonl
from shomin.tasks.ground.settings import ModelSpec
from shomin.tasks.models import chat
from shomin.tasks.models.loading import load_causal_lm, load_tokenizer, resolve_device
from shomin.tasks.models import stats
from shomin.tasks.models.ppo_math import logprobs_from_logits
from shomin.tasks.models.reward import build_reward
from torch import nn


class PolicyWithValue(nn.Module):
    """LoRA policy + scalar value head as one module, so DDP syncs every trainable parameter."""

    def __init__(self, lm, temperature: float = 1.0, value_head: bool = True):
        super().__init__()
        self.lm, self.temperature = lm, temperature
        self.v_head = nn.Linear(lm.config.hidden_size, 1, device=lm.device, dtype=torch.float32) if value_head else None
        if self.v_head is not None:  # V=0 at start: early advantages are the plain returns, not a random head's noise
            nn.init.zeros_(self.v_head.weight)
            nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids, attention_mask):
        # Left padding: count positions from the first real token, exactly as generate() does.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=self.v_head is not None, use_cache=False)
        values = self.v_head(out.hidden_states[-1].float()).squeeze(-1) if self.v_head is not None else None
        # The policy PPO optimises is the one that samples: logits at the sampling temperature.
        # (top_k/top_p truncation is not reflected, as in the classic TRL recipe.)
        return out.logits.float() / self.temperature, values


def build_queries(path: str | Path, tok, settings: PolicyRecord, seed: int) -> list[str]:
    """Queries from a dataset JSONL. Text rows: the opening N tokens, N uniform in
    [query_min_tokens, query_max_tokens] (seeded); instruction rows: the prompt; chat rows: the
    conversation up to its last answer, rendered with the generation prompt."""
    rng, queries = random.Random(seed), []
    for row in read_jsonl(path):
        if "messages" in row:
            queries.append(chat.render(tok, last_exchange(row["messages"])[0], generation_prompt=True))
            continue
        if "prompt" in row:
            queries.append(row["prompt"])
            continue
        ids = tok(row["text"], add_special_tokens=False).input_ids
        n = rng.randint(settings.query_min_tokens, settings.query_max_tokens)
        queries.append(tok.decode(ids[:n]).rstrip("\ufffd"))  # drop half a multi-byte character
    queries = [q for q in queries if q.strip()]
    if not queries:
        raise ConfigError(f"ppo: no usable queries in {path}")
    return queries


def eos_token_ids(tok, lm, device) -> torch.Tensor:
    ids = lm.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids]) | {tok.eos_token_id}
    return torch.tensor(sorted(i for i in ids if i is not None), device=device)


def response_mask(response: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it: generate() pads finished rows (pad may equal EOS)."""
    is_eos = torch.isin(response, eos_ids).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()


@torch.no_grad()
def rollout(policy: PolicyWithValue, tok, queries: list[str], settings: PolicyRecord, length: int,
            eos_ids: torch.Tensor) -> dict:
    """Sample a response of at most `length` new tokens per query; stops early at EOS (no min length)."""
    enc = tok(queries, return_tensors="pt", padding=True).to(eos_ids.device)  # padding_side is left
    out = policy.lm.generate(**enc, do_sample=True, top_k=settings.top_k, top_p=settings.top_p,
                             temperature=settings.temperature, max_new_tokens=length, min_new_tokens=0,
                             pad_token_id=tok.pad_token_id)
    response = out[:, enc.input_ids.shape[1]:]
    return {"query": enc.input_ids, "query_mask": enc.attention_mask,
            "response": response, "response_mask": response_mask(response, eos_ids)}


def forward(model, batch: dict, idx=slice(None)):
    """Log-probs, values and logits at the response positions (position t predicts response token t)."""
    ids = torch.cat([batch["query"], batch["response"]], 1)[idx]
    attn = torch.cat([batch["query_mask"], batch["response_mask"]], 1)[idx]
    logits, values = model(ids, attn)
    start = batch["query"].shape[1] - 1
    logits = logits[:, start:-1]
    values = values[:, start:-1] if values is not None else None
    return logprobs_from_logits(logits, batch["response"][idx]), values, logits


def score(reward_fn, tok, batch: dict) -> torch.Tensor:
    """The reward judges what a reader sees: query + response, decoded without special tokens."""
    texts = [tok.decode(torch.cat([q[qm.bool()], r[rm.bool()]]), skip_special_tokens=True)
             for q, qm, r, rm in zip(batch["query"], batch["query_mask"], batch["response"], batch["response_mask"])]
    return torch.tensor(reward_fn(texts), dtype=torch.float32, device=batch["query"].device)


@torch.no_grad()
def evaluate_policy(merged_path: str, adapter_path: str, spec: ModelSpec, settings: PolicyRecord,
                    queries: list[str], *, device: str = "cpu", seed: int = 0, samples: int = 1,
                    max_new_tokens: int | None = None, scorers: dict | None = None) -> dict:
    """Reward of the SFT model vs the PPO policy on the same queries, and the policy's KL from the SFT model,
    each with its standard error across queries (tasks/models/stats.py).

    Both sides *sample* with the training settings (top_k/top_p/temperature), up to max_new_tokens
    (default response_max_tokens), `samples` times per query; for each sample and batch both sides
    are seeded alike, so they share random numbers and the gain is a paired difference. KL is
    sum(logp_policy - logp_sft) over the policy's own samples: an unbiased estimate of KL(policy || SFT).
    One model in memory: the SFT side is the same model under disable_adapter(). The caller's random
    state is left as it was. `scorers` names the reward functions that judge both sides (default:
    {"reward": the policy's own reward}); each gives `<name>_sft`, `<name>_ppo`, `<name>_gain`.
    """
    device = resolve_device(device)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.startswith("cuda") else []):
        return _evaluate(merged_path, adapter_path, spec, settings, queries, device, seed, samples, max_new_tokens,
                         scorers)


def _evaluate(merged_path, adapter_path, spec, settings, queries, device, seed, samples, max_new_tokens,
              scorers) -> dict:
    from peft import PeftModel
    tok = load_tokenizer(merged_path, spec.trust_remote_code)
    tok.padding_side = "left"
    lm = PeftModel.from_pretrained(load_causal_lm(merged_path, spec, device, quantization=settings.quantization),
                                   adapter_path)
    policy = PolicyWithValue(lm, settings.temperature, value_head=False).eval()
    if scorers is None:
        scorers = {"reward": build_reward(settings.reward, device)}
    eos_ids = eos_token_ids(tok, lm, lm.device)
    length = max_new_tokens or settings.response_max_tokens
    keys = [f"{name}_{side}" for name in scorers for side in ("sft", "ppo")] + ["kl"]
    per_query = {key: [[] for _ in queries] for key in keys}
    shown: list[dict] = []
    for k in range(samples):
        for i in range(0, len(queries), settings.batch_size):
            chunk = queries[i:i + settings.batch_size]
            texts, scores = _paired_batch(policy, tok, chunk, settings, length, eos_ids, scorers,
                                          seed=seed * 1_000_003 + k * 10_007 + i)
            for key in keys:
                for j in range(len(chunk)):
                    per_query[key][i + j].append(scores[key][j])
            if k == 0:
                shown += [{"query": q, "sft": texts["sft"][j], "ppo": texts["ppo"][j],
                           **{key: scores[key][j] for key in keys if key != "kl"}} for j, q in enumerate(chunk)]
    return {**paired_report(per_query, list(scorers)), "samples_per_query": samples, "n_queries": len(queries),
            "samples": shown}


def _paired_batch(policy, tok, chunk, settings, length, eos_ids, scorers: dict, seed: int):
    """One batch sampled by both sides with the same random numbers, judged by every scorer; KL on
    the policy's own samples."""
    lm, texts, scores = policy.lm, {}, {}
    for side in ("sft", "ppo"):
        torch.manual_seed(seed)
        with lm.disable_adapter() if side == "sft" else nullcontext():
            batch = rollout(policy, tok, chunk, settings, length, eos_ids)
        for name, fn in scorers.items():
            scores[f"{name}_{side}"] = score(fn, tok, batch).tolist()
        texts[side] = [tok.decode(r[m.bool()], skip_special_tokens=True)
                       for r, m in zip(batch["response"], batch["response_mask"])]
    logprobs, _, _ = forward(policy, batch)  # batch = the policy's own samples
    with lm.disable_adapter():
        ref_logprobs, _, _ = forward(policy, batch)
    scores["kl"] = ((logprobs - ref_logprobs) * batch["response_mask"]).sum(1).tolist()
    return texts, scores


def paired_report(per_query: dict[str, list[list[float]]], names: list[str]) -> dict:
    """Per-query means of K samples, then mean ± standard error across queries; each gain paired."""
    means = {key: [stats.mean(v) for v in values] for key, values in per_query.items()}
    out = {}
    out["kl_ppo"], out["kl_ppo_se"] = stats.mean_se(means["kl"])
    for name in names:
        for side in ("sft", "ppo"):
            out[f"{name}_{side}"], out[f"{name}_{side}_se"] = stats.mean_se(means[f"{name}_{side}"])
        out[f"{name}_gain"], out[f"{name}_gain_se"] = stats.paired(means[f"{name}_sft"], means[f"{name}_ppo"])
    return out
