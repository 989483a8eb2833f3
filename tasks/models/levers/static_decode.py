"""Sampling with a fixed-size KV cache, each decode step replayed as a CUDA graph: the rollout's lever.

A decode step is one token per sequence through every layer. Its kernels are tiny, and the
host that issues them (transformers', PEFT's and bitsandbytes' Python, a few hundred
launches a layer) is slower than the GPU that runs them: at the 20B shape a step took
70-90 ms op by op where the weights' memory traffic needs a fraction of that
(bench/gpu_decode_graph.py measures both ways). A CUDA graph issues the whole step at once,
but every tensor it reads must stay where it was recorded, so:

- the KV cache does not grow: transformers' StaticCache, sized for prompt + response;
- the new token, its position, its slot in the cache and the attention mask are written
  into fixed buffers before each replay, the mask as a ready 4D boolean one (transformers
  passes a 4D mask through untouched, so no mask is built inside the graph);
- sampling (the warpers generate() uses, in float32) stays outside the graph, so random
  numbers are drawn exactly as op by op.

Off CUDA, or where recording fails, the same loop runs op by op, and it samples the tokens
`generate(do_sample=True)` samples for the same random numbers (tests/test_ppo.py checks
that on the CPU). The graph and its memory pool are dropped when the rollout ends.
"""
from __future__ import annotations

import torch
from shomin.tasks.models.levers.cuda_graphs import ReplayedStep


def warpers(top_k: int, top_p: float, temperature: float):
    """The logits warpers generate(do_sample=True) applies for these settings, in its order."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    out = LogitsProcessorList()
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


def attention_form(mask: torch.Tensor, lm) -> torch.Tensor:
    """A boolean 4D mask (True = attend) in the form the model's attention reads: SDPA takes it
    as is; eager attention adds it to the scores."""
    if lm.config._attn_implementation == "sdpa":
        return mask
    dtype = next(lm.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float16
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


@torch.no_grad()
def sample(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *, top_k: int,
           top_p: float, temperature: float, pad_token_id: int, eos_ids: torch.Tensor, graphed: bool) -> torch.Tensor:
    """New tokens [batch, <= max_new_tokens] for left-padded prompts; a row ends at its first EOS
    and is padded after it, and sampling stops when every row has ended (as generate() does)."""
    from transformers import StaticCache
    batch, prompt = input_ids.shape
    device, total = input_ids.device, prompt + max_new_tokens
    cache = StaticCache(config=lm.config, max_cache_len=total)
    warp = warpers(top_k, top_p, temperature)

    # Which cache slots a token sees: the prompt's real tokens, then each new token in turn.
    seen = torch.zeros(batch, 1, 1, total, dtype=torch.bool, device=device)
    seen[:, 0, 0, :prompt] = attention_mask.bool()
    causal = torch.ones(prompt, total, dtype=torch.bool, device=device).tril()
    # A padding position sees itself too, so no row of the mask is empty: some attention kernels
    # give NaN for an empty row, and a NaN in the cache reaches later tokens even at weight zero.
    prefill_mask = (causal & seen) | torch.eye(prompt, total, dtype=torch.bool, device=device)
    position = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)   # counted from the first real token
    logits = lm(input_ids=input_ids, attention_mask=attention_form(prefill_mask, lm),
                position_ids=position, past_key_values=cache, use_cache=True,
                cache_position=torch.arange(prompt, device=device), logits_to_keep=1).logits

    # The fixed buffers a recorded step reads.
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    step_position = position[:, -1:].clone()
    slot = torch.tensor([prompt - 1], device=device)

    def decode_step() -> tuple:
        out = lm(input_ids=token, attention_mask=attention_form(seen, lm), position_ids=step_position,
                 past_key_values=cache, use_cache=True, cache_position=slot, logits_to_keep=1)
        return (out.logits,)

    step = ReplayedStep(decode_step, []) if graphed and device.type == "cuda" else decode_step
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    new_tokens = []
    try:
        for t in range(max_new_tokens):
            if t > 0:
                token.copy_(new_tokens[-1][:, None])
                step_position.add_(1)
                slot.add_(1)
                seen.index_fill_(-1, slot, True)   # generate() extends every row's mask, ended or not
                logits = step()[0]
            scores = warp(input_ids, logits[:, -1].float())
            drawn = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            drawn = torch.where(unfinished, drawn, torch.full_like(drawn, pad_token_id))
            new_tokens.append(drawn)
            unfinished &= ~torch.isin(drawn, eos_ids)
            if not unfinished.any():
                break
    finally:
        if isinstance(step, ReplayedStep):
            step.close()
    return torch.stack(new_tokens, 1)
