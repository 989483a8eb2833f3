"""`gradient_checkpointing: mlp` (the PPO stage): recompute only each layer's MLP, with the norm
in front of it, in the backward pass; everything else keeps its activations.

Most of a decoder layer's saved activations are its MLP's: the activation function's input is
4x the hidden width (on the 20B shape at a PPO mini-batch of 96 tokens, 96 x 24576 in bf16 =
4.7 MB a layer, against 1.2 MB for a hidden-wide tensor), while most of what whole-layer
checkpointing recomputes (the attention's projections, the attention itself) is outside it.
Recomputing only the norm, the MLP's first projection and the activation frees most of that
memory for less recompute. torch's non-reentrant checkpoint stops recomputing once the last
saved tensor is back, so the MLP's output projection runs once.

The norm is moved inside the checkpoint because its output is the MLP's input: left outside,
the checkpoint would keep that (hidden-wide) output, which nothing else holds. It needs the
layer layout of GPT-NeoX, Llama, Qwen and Mistral: a `post_attention_layernorm` that only
feeds the `mlp`.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _layers(lm) -> list[torch.nn.Module]:
    return [m for m in lm.modules() if isinstance(getattr(m, "mlp", None), torch.nn.Module)
            and isinstance(getattr(m, "post_attention_layernorm", None), torch.nn.Module)]


def enable(lm) -> int:
    """Route every decoder layer's post-attention norm + MLP through one checkpoint (while
    gradients are on; otherwise the same two calls). Returns how many layers; 0 for a layout
    without `post_attention_layernorm` + `mlp` (the caller refuses it)."""
    layers = _layers(lm)
    for layer in layers:
        norm, mlp = layer.post_attention_layernorm, layer.mlp
        norm_forward, mlp_forward = norm.forward, mlp.forward

        def normed_mlp(x, norm_forward=norm_forward, mlp_forward=mlp_forward):
            return mlp_forward(norm_forward(x))

        def checkpointed(x, normed_mlp=normed_mlp):
            if not torch.is_grad_enabled():
                return normed_mlp(x)
            # eval mode draws no random numbers, and reading the RNG state would break a CUDA graph
            return checkpoint(normed_mlp, x, use_reentrant=False, preserve_rng_state=False)

        norm.forward = lambda x: x   # the layer still calls it; the norm now runs inside the MLP's checkpoint
        mlp.forward = checkpointed
    return len(layers)
