"""Frozen 4-bit layers dequantized a slice of rows at a time, never as a whole.

bitsandbytes' `Linear4bit` computes x @ W^T by first writing all of W in 16 bits (302 MB
for one MLP matrix of a 20B model), then a GEMM reads it back; the backward does the same
again. That copy sits on top of the peak of whatever runs: with a PPO policy on a 4-bit
20B base it is a fifth of the memory the stage uses above its weights.

Here the same stored weights (4-bit codes, absmax per 64 weights, double-quantized or not)
go through bitsandbytes' own dequantize in slices of rows of at most CHUNK_BYTES
(levers/int8_weights.py), each consumed by torch's GEMM before the next is made: the
same float32 products rounded once to the compute dtype, so the same result as
bitsandbytes' layer. The weight is frozen, so nothing of the input is kept for the
backward (grad_x = grad_y @ W needs only W). More launches per layer than one whole
dequantize: under the PPO update's CUDA graph they cost nothing; in a host-bound rollout a
little. (A Triton GEMM that decodes the 4-bit codes in registers was tried, 2026-11-24:
three designs, 0.48 to 3.5 ms against bitsandbytes' 0.26 ms on one 18432x6144 layer at 96
rows, so not shipped.)

`ModelSpec.int4_matmul: bitsandbytes` keeps bitsandbytes' own computation.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from shomin.tasks.models.levers.int8_weights import row_chunks

@dataclass(frozen=True)
class Layout:
    """How one frozen 4-bit weight is stored, read once when the layer is routed (reading the
    double-quantization offset is a host sync, which must not happen per call: a CUDA graph
    capture forbids it; bitsandbytes' own layer adds it as a device tensor)."""
    shape: tuple[int, int]
    blocksize: int
    quant_type: str
    code: torch.Tensor                   # the 16 values a 4-bit code stands for, float32
    absmax: torch.Tensor                 # one per block: float32, or uint8 under double quantization
    code2: torch.Tensor | None = None    # double quantization: the absmax's own code table ...
    absmax2: torch.Tensor | None = None  # ... its per-`block2` scales ...
    block2: int = 1
    offset: float = 0.0                  # ... and the mean added back

    @classmethod
    def of(cls, weight) -> "Layout":
        return cls.from_state(weight.quant_state)

    @classmethod
    def from_state(cls, state) -> "Layout":
        nested = state.nested
        return cls(shape=tuple(state.shape), blocksize=state.blocksize, quant_type=state.quant_type,
                   code=state.code.float(), absmax=state.absmax,
                   code2=state.state2.code if nested else None, absmax2=state.state2.absmax if nested else None,
                   block2=state.state2.blocksize if nested else 1, offset=float(state.offset) if nested else 0.0)

    def absmax_float(self) -> torch.Tensor:
        """Every block's absmax in float32 (bitsandbytes' own blockwise dequantize + the offset)."""
        if self.code2 is None:
            return self.absmax.float()
        import bitsandbytes.functional as bnbf
        state2 = bnbf.QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.block2, dtype=torch.float32)
        return bnbf.dequantize_blockwise(self.absmax, state2) + self.offset


def dequantized(packed: torch.Tensor, layout: Layout, absmax: torch.Tensor, rows: tuple[int, int],
                dtype: torch.dtype) -> torch.Tensor:
    """Rows [a, b) of W in `dtype`, by bitsandbytes' dequantize (float32 products, rounded once)."""
    a, b = rows
    cols = layout.shape[1]
    flat = packed.view(-1)[a * cols // 2: b * cols // 2]
    blocks = absmax[a * cols // layout.blocksize: -(-b * cols // layout.blocksize)]
    return torch.ops.bitsandbytes.dequantize_4bit(flat, blocks, layout.blocksize, layout.quant_type, [b - a, cols],
                                                  dtype)


def _chunks(layout: Layout, itemsize: int) -> list[tuple[int, int]]:
    rows, cols = layout.shape
    if cols % layout.blocksize:   # a row slice would cut an absmax block: the whole weight at once
        return [(0, rows)]
    return row_chunks(rows, cols, itemsize)


def sliced_forward(x2d, packed, layout: Layout, bias):
    absmax = layout.absmax_float()
    parts = [F.linear(x2d, dequantized(packed, layout, absmax, rows, x2d.dtype),
                      None if bias is None else bias[rows[0]:rows[1]])
             for rows in _chunks(layout, x2d.element_size())]
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def sliced_grad(grad2d, packed, layout: Layout):
    absmax = layout.absmax_float()
    grad_x = grad2d.new_zeros((grad2d.shape[0], layout.shape[1]))
    for a, b in _chunks(layout, grad2d.element_size()):
        grad_x.addmm_(grad2d[:, a:b], dequantized(packed, layout, absmax, (a, b), grad2d.dtype))
    return grad_x


class Int4WeightLinear(torch.autograd.Function):
    """y = x @ W^T + bias with W frozen in bitsandbytes' 4-bit storage (`packed`, `layout`)."""

    @staticmethod
    def forward(ctx, x, packed, layout: Layout, bias):
        ctx.save_for_backward(packed)   # the frozen weight, not the input
        ctx.layout, ctx.has_bias = layout, bias is not None
        y = sliced_forward(x.reshape(-1, x.shape[-1]), packed, layout, bias)
        return y.view(*x.shape[:-1], layout.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        (packed,) = ctx.saved_tensors
        layout, grad_x, grad_bias = ctx.layout, None, None
        flat = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = sliced_grad(flat, packed, layout).view(*grad_out.shape[:-1], layout.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = flat.sum(0)
        return grad_x, None, None, grad_bias


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' Linear4bit contract: compute in compute_dtype, the bias follows it, the
    result comes back in the input's dtype."""
    in_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    if self.bias is not None and self.bias.dtype != x.dtype:
        self.bias.data = self.bias.data.to(x.dtype)
    return Int4WeightLinear.apply(x, self.weight.data, self._shomin_layout, self.bias).to(in_dtype)


def use_sliced(model) -> int:
    """Route every frozen bitsandbytes 4-bit linear of `model` through Int4WeightLinear.
    Returns how many."""
    import bitsandbytes as bnb
    n = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or module.weight.requires_grad:
            continue
        module._shomin_layout = Layout.of(module.weight)
        # an instance attribute shadows the class's forward; accelerate's hooks, where present, call _old_forward
        target = "_old_forward" if hasattr(module, "_old_forward") else "forward"
        setattr(module, target, types.MethodType(_forward, module))
        n += 1
    return n
