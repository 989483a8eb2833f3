"""`gradient_checkpointing: selective` (the PPO stage): in the backward pass recompute only the
parts of each decoder layer whose saved activations are wide and whose recompute is cheap: the
post-attention norm + MLP, and the attention itself (not its projections).

What a layer keeps for the backward is mostly its MLP's: the activation function's input is
4x the hidden width (on the 20B shape at a PPO mini-batch of 96 tokens, 96 x 24576 in bf16 =
4.7 MB a layer, against 1.2 MB for a hidden-wide tensor); then the attention's output, which
fused attention kernels keep beside q, k and v. Whole-layer checkpointing frees those too, but
recomputes the attention's projections (on a 4-bit base, a quarter of a layer's GEMM time) as
well. Here:

- the post-attention norm runs inside the MLP's checkpoint (left outside, the checkpoint would
  keep its output, which nothing else holds); torch's non-reentrant checkpoint stops
  recomputing once the last saved tensor is back, so the MLP's output projection runs once;
- during the update the model's attention function is a checkpointed copy of itself, registered
  with transformers' attention interface under `<name>_recomputed` (with the same mask
  function): it keeps q, k and v, which the projections' backward holds anyway, and not the
  output. Rollouts and scoring keep the plain one.

Needs the layer layout of GPT-NeoX, Llama, Qwen and Mistral: a `post_attention_layernorm` that
only feeds the `mlp`. An attention implementation transformers does not register (eager) is
left as is.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

SUFFIX = "_recomputed"


def _recomputed(function):
    """`function` (an attention implementation or a norm + MLP) recomputed in the backward pass
    while gradients are on; no RNG state kept: eval mode draws none, and reading it would break a
    CUDA graph."""
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return function(*args, **kwargs)
        return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
    return run


def enable(lm) -> int:
    """Route every decoder layer's post-attention norm + MLP through one checkpoint. Returns how
    many layers; 0 for a layout without `post_attention_layernorm` + `mlp` (the caller refuses it)."""
    layers = [m for m in lm.modules() if isinstance(getattr(m, "mlp", None), torch.nn.Module)
              and isinstance(getattr(m, "post_attention_layernorm", None), torch.nn.Module)]
    for layer in layers:
        norm, mlp = layer.post_attention_layernorm, layer.mlp
        norm_forward, mlp_forward = norm.forward, mlp.forward
        mlp.forward = _recomputed(lambda x, norm_forward=norm_forward, mlp_forward=mlp_forward: mlp_forward(norm_forward(x)))
        norm.forward = lambda x: x   # the layer still calls it; the norm now runs inside the MLP's checkpoint
    return len(layers)


@contextlib.contextmanager
def recomputed_attention(lm):
    """For the `with` block, `lm`'s attention through a checkpointed copy of its implementation."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    config = lm.config
    name = config._attn_implementation
    if name not in ALL_ATTENTION_FUNCTIONS or name not in ALL_MASK_ATTENTION_FUNCTIONS:
        yield
        return
    if name + SUFFIX not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name + SUFFIX, _recomputed(ALL_ATTENTION_FUNCTIONS[name]))
        AttentionMaskInterface.register(name + SUFFIX, ALL_MASK_ATTENTION_FUNCTIONS[name])
    config._attn_implementation = name + SUFFIX
    try:
        yield
    finally:
        config._attn_implementation = name
