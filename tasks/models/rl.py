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
from shomin.tasks.models.loading import free, load_causal_lm, load_tokenizer, resolve_device
from shomin.tasks.models import stats
from shomin.tasks.models.levers import static_decode
from shomin.tasks.models.ppo_math import logprobs_from_logits, token_entropy
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

    def forward(self, input_ids, attention_mask, logits_to_keep: int = 0, adapter_names: list[str] | None = None,
                scaled: bool = True):
        """(logits, values) at the last `logits_to_keep` positions (all when 0)."""
        # Left padding: count positions from the first real token, exactly as generate() does.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
        # The value head reads what the LM head reads: the last layer's normed output at the kept
        # positions, caught on its way in. Asking for output_hidden_states instead would keep every
        # layer's output of the batch (0.4 GiB for the reference pass of 32 rollouts at 20B).
        head_input = []
        hook = self.lm.get_output_embeddings().register_forward_pre_hook(
            lambda module, args: head_input.append(args[0])) if self.v_head is not None else None
        try:
            # logits_to_keep: the LM head runs on the last N positions only (the response's), so the
            # full-vocabulary logits of the query are never made.
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False, logits_to_keep=logits_to_keep, **extra)
        finally:
            if hook is not None:
                hook.remove()
        values = self.v_head(head_input[-1].float()).squeeze(-1) if self.v_head is not None else None
        if not scaled:   # the caller takes the float32 log-softmax in pieces
            return out.logits, values
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
            eos_ids: torch.Tensor, graphed: bool = False) -> dict:
    """Sample a response of at most `length` new tokens per query; stops early at EOS (no min length).
    graphed: decode on a fixed-size KV cache, each step replayed as a CUDA graph on CUDA
    (levers/static_decode.py), instead of generate(): the same sampling, the host out of the way."""
    enc = tok(queries, return_tensors="pt", padding=True).to(eos_ids.device)  # padding_side is left
    if graphed:
        response = static_decode.sample(policy.lm, enc.input_ids, enc.attention_mask, length, top_k=settings.top_k,
                                        top_p=settings.top_p, temperature=settings.temperature,
                                        pad_token_id=tok.pad_token_id, eos_ids=eos_ids, graphed=True)
    else:
        out = policy.lm.generate(**enc, do_sample=True, top_k=settings.top_k, top_p=settings.top_p,
                                 temperature=settings.temperature, max_new_tokens=length, min_new_tokens=0,
                                 pad_token_id=tok.pad_token_id)
        response = out[:, enc.input_ids.shape[1]:]
    return {"query": enc.input_ids, "query_mask": enc.attention_mask,
            "response": response, "response_mask": response_mask(response, eos_ids)}


def sequences(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Query + response token ids and their attention mask, as the policy reads them."""
    return (torch.cat([batch["query"], batch["response"]], 1),
            torch.cat([batch["query_mask"], batch["response_mask"]], 1))


def forward(model, batch: dict, idx=slice(None)):
    """Log-probs, values and logits at the response positions (position t predicts response token t)."""
    ids, attn = (x[idx] for x in sequences(batch))
    n = batch["response"].shape[1]
    logits, values = model(ids, attn, logits_to_keep=n + 1)   # the last query position predicts response token 0
    values = values[:, :-1] if values is not None else None   # kept positions: the last query one onwards
    return logprobs_from_logits(logits[:, :-1], batch["response"][idx]), values, logits[:, :-1]


def with_reference(policy: PolicyWithValue, batch: dict, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                                torch.Tensor, torch.Tensor]:
    """`forward` of the policy and of the reference (the same weights, adapter off) in one batched pass:
    peft runs the base layers once on both copies of the batch and the LoRA only on the first. The
    float32 log-softmax goes `rows` rows at a time, so the full-vocabulary float32 tensor of the
    whole rollout is never made. Returns (logprobs, values, per-token entropy of the policy,
    ref_logprobs); no gradients."""
    n, length = batch["query"].shape[0], batch["response"].shape[1]
    ids, attn = (x.repeat(2, 1) for x in sequences(batch))
    with torch.no_grad():
        logits, values = policy(ids, attn, logits_to_keep=length + 1, adapter_names=["default"] * n + ["__base__"] * n,
                                scaled=False)
        labels = batch["response"].repeat(2, 1)
        logp, entropy = [], []
        for i in range(0, 2 * n, rows):
            chunk = logits[i:i + rows, :-1].float() / policy.temperature
            logp.append(logprobs_from_logits(chunk, labels[i:i + rows]))
            if i < n:
                entropy.append(token_entropy(chunk[: n - i]))
    logp = torch.cat(logp)
    values = values[:n, :-1] if values is not None else None
    return logp[:n], values, torch.cat(entropy), logp[n:]


def judged_texts(tok, batch: dict) -> list[str]:
    """What a reward judges, as a reader sees it: query + response, decoded without special tokens."""
    return [tok.decode(torch.cat([q[qm.bool()], r[rm.bool()]]), skip_special_tokens=True)
            for q, qm, r, rm in zip(batch["query"], batch["query_mask"], batch["response"], batch["response_mask"])]


def score(reward_fn, tok, batch: dict) -> torch.Tensor:
    return torch.tensor(reward_fn(judged_texts(tok, batch)), dtype=torch.float32, device=batch["query"].device)


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
    One model in memory at a time: the SFT side is the same model under disable_adapter(), and the
    scorers judge the texts after it is freed, each built in turn (a trained reward model would
    otherwise sit beside a 20B policy). The caller's random state is left as it was. `scorers`
    maps a name to a function that builds a reward (default: {"reward": the policy's own}); each
    gives `<name>_sft`, `<name>_ppo`, `<name>_gain`.
    """
    device = resolve_device(device)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.startswith("cuda") else []):
        sampled = _sample_both(merged_path, adapter_path, spec, settings, queries, device, seed, samples,
                               max_new_tokens)
    free()   # the policy is gone before any scorer (a reward model is a model too) loads
    if scorers is None:
        scorers = {"reward": lambda: build_reward(settings.reward, device)}
    per_query = {"kl": sampled["kl"]}
    for name, make in scorers.items():
        fn = make()
        for side in ("sft", "ppo"):
            flat = fn([t for per in sampled[side] for t in per])
            per_query[f"{name}_{side}"] = _regroup(flat, sampled[side])
        del fn
        free()
    shown = [{"query": q, "sft": sampled["shown"][i]["sft"], "ppo": sampled["shown"][i]["ppo"],
              **{f"{name}_{side}": per_query[f"{name}_{side}"][i][0] for name in scorers for side in ("sft", "ppo")}}
             for i, q in enumerate(queries)]
    return {**paired_report(per_query, list(scorers)), "samples_per_query": samples, "n_queries": len(queries),
            "samples": shown}


def _regroup(flat: list[float], like: list[list]) -> list[list[float]]:
    """Flat scores back into one list per query, shaped like `like`."""
    out, i = [], 0
    for per in like:
        out.append(list(flat[i:i + len(per)]))
        i += len(per)
    return out


def _sample_both(merged_path, adapter_path, spec, settings, queries, device, seed, samples, max_new_tokens) -> dict:
    """Every sample of both sides as the text a reward judges, and the policy's KL per sample;
    the model is loaded here and dropped on return."""
    from peft import PeftModel
    tok = load_tokenizer(merged_path, spec.trust_remote_code)
    tok.padding_side = "left"
    lm = PeftModel.from_pretrained(load_causal_lm(merged_path, spec, device, quantization=settings.quantization),
                                   adapter_path)
    policy = PolicyWithValue(lm, settings.temperature, value_head=False).eval()
    eos_ids = eos_token_ids(tok, lm, lm.device)
    length = max_new_tokens or settings.response_max_tokens
    out = {key: [[] for _ in queries] for key in ("sft", "ppo", "kl")}
    out["shown"] = [{} for _ in queries]
    for k in range(samples):
        for i in range(0, len(queries), settings.batch_size):
            chunk = queries[i:i + settings.batch_size]
            judged, answers, kl = _paired_batch(policy, tok, chunk, settings, length, eos_ids,
                                                seed=seed * 1_000_003 + k * 10_007 + i)
            for j in range(len(chunk)):
                for side in ("sft", "ppo"):
                    out[side][i + j].append(judged[side][j])
                    if k == 0:
                        out["shown"][i + j][side] = answers[side][j]
                out["kl"][i + j].append(kl[j])
    return out


def _paired_batch(policy, tok, chunk, settings, length, eos_ids, seed: int):
    """One batch sampled by both sides with the same random numbers: the texts a reward judges
    (query + response), the responses alone, and the KL on the policy's own samples."""
    lm, judged, answers = policy.lm, {}, {}
    for side in ("sft", "ppo"):
        torch.manual_seed(seed)
        with lm.disable_adapter() if side == "sft" else nullcontext():
            batch = rollout(policy, tok, chunk, settings, length, eos_ids,
                            graphed=settings.cuda_graphs and eos_ids.is_cuda)
        judged[side] = judged_texts(tok, batch)
        answers[side] = [tok.decode(r[m.bool()], skip_special_tokens=True)
                         for r, m in zip(batch["response"], batch["response_mask"])]
    logprobs, _, _, ref_logprobs = with_reference(policy, batch)  # batch = the policy's own samples
    return judged, answers, ((logprobs - ref_logprobs) * batch["response_mask"]).sum(1).tolist()


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
