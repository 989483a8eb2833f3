"""The SFT stage's `mlp_chunk_tokens` lever: each decoder layer's MLP runs over the tokens of
a micro-batch in chunks, and its backward recomputes one chunk at a time.

The MLP is token-wise, so chunking it along the tokens is exact. What it saves is the
MLP's intermediate activations: gate, up and their product are tokens x intermediate each
(at 100k tokens on a Llama-3-8B shape, 2.9 GB apiece, with their LoRA dropout copies
and gradients about 15 GB), where a chunk of 4096 needs a fortieth of that. This is the
tiled MLP of DeepSpeed's long-sequence training (and Liger's `LigerTiledMLPFunction`);
Liger's backward draws new random numbers for the recompute, so LoRA dropout would get
other masks than the forward that produced the loss. Here the backward restores the
random state the forward started from, so every chunk sees its own masks again.

Under the stage's own checkpointing (levers/checkpointing.py) a layer's recompute does
not run the chunks at all when the MLP's output only feeds the residual add (its
last projection is flagged by fast_lora.mark_residual_outputs): the backward below
recomputes each chunk anyway, so the MLP costs what it did unchunked.
"""
from __future__ import annotations

import types

import torch
from shomin.tasks.models.levers.checkpointing import recompute_scope, recomputing, replaying_rng, rng_state


class ChunkedMLP(torch.autograd.Function):
    """y = mlp(x) chunk by chunk along the tokens, keeping only x for the backward."""

    @staticmethod
    def forward(ctx, x, mlp_forward, chunk, skip, *params):
        ctx.mlp_forward, ctx.chunk, ctx.rng = mlp_forward, chunk, rng_state(x.device)
        ctx.save_for_backward(x)
        if skip:   # a recompute whose output only feeds the residual add: no value needed
            return x.new_zeros(()).expand(x.shape)
        return _chunks(mlp_forward, x, chunk)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        flat_x, flat_grad = x.detach().reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_x = torch.empty_like(flat_x) if ctx.needs_input_grad[0] else None
        with replaying_rng(x.device, ctx.rng):   # the forward's dropout masks, chunk by chunk, in order
            for start in range(0, flat_x.shape[0], ctx.chunk):
                part = flat_x[start:start + ctx.chunk].unsqueeze(0).requires_grad_(grad_x is not None)
                # flagged as a recompute: the last projection skips its GEMM (its value is not needed)
                with torch.enable_grad(), recompute_scope():
                    out = ctx.mlp_forward(part)
                torch.autograd.backward(out, flat_grad[start:start + ctx.chunk].unsqueeze(0))
                if grad_x is not None:   # the LoRA weights' gradients were accumulated by the call above
                    grad_x[start:start + ctx.chunk] = part.grad[0]
        return (None if grad_x is None else grad_x.view(x.shape), None, None, None, *([None] * len(ctx.needs_input_grad[4:])))


def _chunks(mlp_forward, x: torch.Tensor, chunk: int) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = None
    with torch.no_grad():
        for start in range(0, flat.shape[0], chunk):
            part = mlp_forward(flat[start:start + chunk].unsqueeze(0))[0]
            if out is None:
                out = part.new_empty(flat.shape[0], part.shape[-1])
            out[start:start + chunk] = part
    return out.view(*x.shape[:-1], out.shape[-1])


def _chunked_forward(self, x: torch.Tensor) -> torch.Tensor:
    chunk = self._shomin_chunk
    tokens = x.numel() // x.shape[-1]
    if tokens <= chunk:
        return self._shomin_forward(x)
    if not torch.is_grad_enabled():   # a forward no backward follows (evaluation, a checkpoint's first pass)
        return _chunks(self._shomin_forward, x, chunk)
    params = [p for p in self.parameters() if p.requires_grad]
    skip = recomputing() and self._shomin_feeds_residual
    return ChunkedMLP.apply(x, self._shomin_forward, chunk, skip, *params)


def enable(model: torch.nn.Module, chunk_tokens: int) -> int:
    """Chunk the `mlp` of every decoder layer of `model` (a transformers model or a PEFT model
    around one); returns how many. Apply after anything that replaces the MLP's forward
    (Liger's kernels, which the Trainer applies when it is built)."""
    n = 0
    for module in model.modules():
        mlp = getattr(module, "mlp", None)
        if not isinstance(module, _decoder_layer()) or mlp is None or hasattr(mlp, "_shomin_chunk"):
            continue
        mlp._shomin_forward, mlp._shomin_chunk = mlp.forward, chunk_tokens
        mlp._shomin_feeds_residual = any(getattr(m, "_shomin_feeds_residual", False) for m in mlp.modules())
        mlp.forward = types.MethodType(_chunked_forward, mlp)
        n += 1
    return n


def _decoder_layer():
    from transformers.modeling_layers import GradientCheckpointingLayer
    return GradientCheckpointingLayer
