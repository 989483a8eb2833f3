"""The SFT stage's `padding_free` lever: each micro-batch's rows are laid end to end in one
row, without padding, their positions restarting at 0 for each row (TRL's own collator,
`DataCollatorForLanguageModeling(padding_free=True)`), so no compute goes to pad tokens.
The rows of a step stay the rows they were: only their padding goes.

Attention must then not cross from one row into the next. transformers sees the restarting
positions and builds a block-diagonal causal mask for SDPA, which is exact on any device
but makes attention quadratic in the whole micro-batch's length. On CUDA, attention instead
runs PyTorch's own variable-length flash kernel (`torch.nn.attention.varlen.varlen_attn`)
over the row boundaries the collator computes (`cu_seq_lens_q`): exact, and no wasted
work. That implementation is registered with transformers under VARLEN.
"""
from __future__ import annotations

import functools
import inspect

import torch

VARLEN = "shomin_varlen"


def varlen_kernel():
    """PyTorch's varlen flash attention, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: query [1, heads, tokens, d], key/value [1, kv_heads,
    tokens, d]; returns ([1, tokens, heads, d], None)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None and attention_mask is None:   # a batch that had no padding to remove (see `collator`)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if cu is None or query.shape[0] != 1 or attention_mask is not None or dropout:
        raise ValueError(f"{VARLEN} attention is for padding-free training batches (one row, cu_seq_lens_q, no mask)")
    kernel = varlen_kernel()
    params = _parameters(kernel)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))   # [tokens, heads, d]
    extra = {}
    if k.shape[1] != q.shape[1]:   # grouped-query attention
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    if "is_causal" in params:       # torch 2.9-2.11
        extra["is_causal"] = True
    else:                           # later: causal is a window open to the left
        extra["window_size"] = (-1, 0)
    if "scale" in params:
        extra["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-6:
        raise ValueError(f"{VARLEN}: this torch's varlen_attn takes no scale, and this model's is {scaling}")
    cu = cu.to(device=q.device, dtype=torch.int32)
    longest = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
    out = kernel(q, k, v, cu, cu, longest, longest, **extra)
    return out.unsqueeze(0), None


@functools.cache
def _parameters(kernel) -> frozenset:
    """The names of the kernel's parameters (they changed between torch releases), read once per
    kernel: the attention above runs in every layer of every forward."""
    return frozenset(inspect.signature(kernel).parameters)


def register() -> None:
    """Make VARLEN an attention implementation transformers knows, with no mask built for it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    AttentionInterface.register(VARLEN, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, flash_attention_mask)


def exact(model) -> bool:
    """Padding-free batches are exact for this model: its attention builds its mask through
    transformers' masking_utils (which reads restarting positions as separate sequences) and
    its positions come from position_ids. The architectures the tests check are listed."""
    from transformers import masking_utils
    return hasattr(masking_utils, "find_packed_sequence_indices") and \
        getattr(getattr(model, "config", None), "model_type", "") in PACKABLE


PACKABLE = {"llama", "mistral", "qwen2", "qwen3", "gpt_neox"}


def prepare(model, device: str) -> bool:
    """Ready a transformers model for padding-free batches; returns whether attention runs the
    varlen kernel. transformers reads restarting positions as separate sequences only when no
    KV cache is made, and its models make one in a training forward while `use_cache` is on."""
    model.config.use_cache = False
    return use_varlen(model, device)


def use_varlen(model, device: str) -> bool:
    """On CUDA where PyTorch has its varlen kernel: switch attention to it."""
    if device != "cuda" or varlen_kernel() is None:
        return False
    register()
    model.set_attn_implementation(VARLEN)
    return True


def collator(tokenizer):
    """TRL's collator, padding-free where a micro-batch has padding to remove. Rows that all have
    one length go as a plain batch: there is nothing to remove, and the batched attention
    kernels were faster (an 8-layer llama7b, 4 x 2048 tokens, H100: 39,697 tokens/s batched,
    37,557 laid end to end)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    flat = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    batched = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)

    def collate(rows: list[dict]) -> dict:
        return batched(rows) if len({len(r["input_ids"]) for r in rows}) == 1 else flat(rows)
    return collate
