"""Frozen 8-bit layers computed weight-only: the stored int8 rows are dequantized, in
chunks, and multiplied in 16 bits.

bitsandbytes' LLM.int8() (its `Linear8bitLt`) also quantizes the *activations* on every
call, searches them for outlier columns (a host sync and a data-dependent shape) and, in
the backward, rebuilds the whole 16-bit weight in three element-wise passes. Under a LoRA
at small token counts (a PPO update mini-batch is 4 x 24 tokens) that is bound by the
host and by those passes: on the 20B shape one update mini-batch took 314 ms of wall
time for 187 ms of kernels, 138 ms of them dequantizing (README, "Benchmarks").

Here the same stored weights (int8 rows `CB`, per-row absmax `SCB`) are used as they
are: W = CB * SCB / 127, rounded once to the activations' dtype, times the 16-bit input.
On CUDA one Triton GEMM (levers/int8_kernel.py) dequantizes each tile in registers, so the
16-bit weight never exists; elsewhere (and for float32) W is written in one kernel per
chunk of rows and fed to torch's GEMM. The activations are never quantized, so the result is closer to the 16-bit model
than LLM.int8's (whose outlier threshold exists to approximate exactly this). The weight
is frozen, so nothing of the input is kept for the backward: grad_x = grad_y @ W needs W
only, which is dequantized again there. On the portable path, chunks bound the 16-bit copy that
exists at any moment to CHUNK_BYTES (a 20B model's MLP weights are 302 MB each in 16 bits).

`ModelSpec.int8_matmul: llm_int8` keeps bitsandbytes' own computation (the seed's).
"""
from __future__ import annotations

import functools
import types

import torch
from torch.nn import functional as F

# The portable path's largest 16-bit weight slice alive at once: under a quarter of one of a
# 20B model's MLP weights (302 MB); smaller slices cost a launch each and gain little.
CHUNK_BYTES = 64 << 20


def _row_chunks(n_rows: int, n_cols: int, itemsize: int) -> list[tuple[int, int]]:
    rows = max(1, CHUNK_BYTES // (n_cols * itemsize))
    return [(r, min(r + rows, n_rows)) for r in range(0, n_rows, rows)]


def dequantized(cb: torch.Tensor, scale: torch.Tensor, rows: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Rows [a, b) of W = CB * scale in `dtype`: one kernel, the product taken in float32 and rounded
    once (as bitsandbytes' own backward does)."""
    a, b = rows
    out = torch.empty((b - a, cb.shape[1]), dtype=dtype, device=cb.device)
    return torch.mul(cb[a:b], scale[a:b], out=out)


@functools.cache
def _kernel():
    """levers/int8_kernel.py where Triton is installed (CUDA builds of torch), else None."""
    try:
        from shomin.tasks.models.levers import int8_kernel
    except ImportError:
        return None
    return int8_kernel


def uses_kernel(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _kernel() is not None


def portable_forward(x2d: torch.Tensor, cb: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2d @ W^T + bias through chunks of 16-bit rows (any device, any dtype)."""
    parts = [F.linear(x2d, dequantized(cb, scale, rows, x2d.dtype), None if bias is None else bias[rows[0]:rows[1]])
             for rows in _row_chunks(cb.shape[0], cb.shape[1], x2d.element_size())]
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def portable_grad(grad2d: torch.Tensor, cb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad2d @ W, accumulated chunk by chunk of W's rows."""
    grad_x = grad2d.new_zeros((grad2d.shape[0], cb.shape[1]))
    for a, b in _row_chunks(cb.shape[0], cb.shape[1], grad2d.element_size()):
        grad_x.addmm_(grad2d[:, a:b], dequantized(cb, scale, (a, b), grad2d.dtype))
    return grad_x


class Int8WeightLinear(torch.autograd.Function):
    """y = x @ (CB * scale)^T + bias with CB int8 [out, in] and scale float32 [out, 1], frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cb: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(cb, scale)   # the frozen weight itself, not the input
        ctx.has_bias = bias is not None
        x2d = x.reshape(-1, x.shape[-1])
        if uses_kernel(x):
            y = _kernel().matmul(x2d, cb, scale.view(-1), bias, transposed=False)
        else:
            y = portable_forward(x2d, cb, scale, bias)
        return y.view(*x.shape[:-1], cb.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        cb, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        flat = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            if uses_kernel(grad_out):
                grad_x = _kernel().matmul(flat, cb, scale.view(-1), None, transposed=True)
            else:
                grad_x = portable_grad(flat, cb, scale)
            grad_x = grad_x.view(*grad_out.shape[:-1], cb.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = flat.sum(0)
        return grad_x, None, None, grad_bias


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.bias is not None and self.bias.dtype != x.dtype:   # as bitsandbytes does: the bias follows x
        self.bias.data = self.bias.data.to(x.dtype)
    return Int8WeightLinear.apply(x, self.weight.data, self._shomin_scale, self.bias)


def use_weight_only(model) -> int:
    """Route every frozen bitsandbytes 8-bit linear of `model` through Int8WeightLinear.
    Returns how many. The per-row scale is read once (float32, [out, 1]: 4 bytes a row)."""
    import bitsandbytes as bnb
    n = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear8bitLt) or module.state.has_fp16_weights:
            continue
        scb = module.state.SCB if module.state.SCB is not None else module.weight.SCB
        module._shomin_scale = scb.float().unsqueeze(1).mul(1.0 / 127.0)
        # an instance attribute shadows the class's forward; accelerate's hooks, where present, call _old_forward
        target = "_old_forward" if hasattr(module, "_old_forward") else "forward"
        setattr(module, target, types.MethodType(_forward, module))
        n += 1
    return n
