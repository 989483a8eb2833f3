"""Frozen bitsandbytes 4-bit layers: decode steps through bitsandbytes' fused 4-bit GEMM
(`ModelSpec.int4_matmul: bitsandbytes`, the default: `use_fused_decode`), and layers that
never hold a whole 16-bit copy of their weight (`int4_matmul: sliced` or `triton`: `use_sliced`).

bitsandbytes' `Linear4bit` mostly computes x @ W^T by dequantizing all of W to 16 bits and
handing it to cuBLAS; its backward dequantizes all of W again for grad_x = grad_y @ W. For
one MLP matrix of a 20B model that copy is 302 MB, and it sits on top of whatever else is
alive: with a PPO policy on a 4-bit 20B base it was a quarter of the stage's memory above
its weights. Here the same stored weights (4-bit codes, one absmax per block, the absmax
itself 8-bit under double quantization) are used three ways, the first two with bitsandbytes'
own kernels:

- up to FUSED_MAX_ROWS rows (a rollout's decode step), bitsandbytes' fused 4-bit GEMM,
  which decodes the codes in registers. bitsandbytes' dispatcher picks it only for some
  shapes on Hopper; on the 20B shapes at 16 rows it is faster for all four matrices
  (0.64 against 0.67 ms a layer, `python bench/gpu_bnb4_paths.py layers`) and makes no copy.
- otherwise, W a slice of rows at a time (at most SLICE_BYTES in 16 bits), each slice
  dequantized and consumed by a GEMM before the next is made, the input's gradient summed
  over slices in float32 (as one GEMM would). At 96 rows that is slower than the whole copy
  (3.05 against 2.01 ms a layer for a replayed forward and backward: the slices' GEMMs are
  thin and many), hence not the default; it is the least memory (README, "Benchmarks").
- `int4_matmul: triton`: up to TILED_MAX_ROWS rows, levers/int4_kernel.py's Triton GEMMs,
  which decode each tile of the stored codes in registers: no copy and no slices, and faster
  than both of bitsandbytes' ways on the 20B shapes (a replayed forward and backward of a layer
  at 96 rows 1.61 against 2.01 ms; a decode step's four matrices at 16 rows 0.39 against the
  fused GEMM's 0.63 ms). Elsewhere (more rows, no Triton, not CUDA) as `sliced`.

The weight is frozen, so nothing of the input is kept for the backward. Each weight is formed
in float32 and rounded once to the compute dtype, as bitsandbytes does.
"""
from __future__ import annotations

import functools
import math
import types

import torch

from shomin.tasks.models.levers import int4_lookup

FUSED_MAX_ROWS = 16
# Smaller slices are thinner, slower GEMMs (16 MiB measured slower than 32; 64 and 128 MiB
# faster but a larger transient: bench/gpu_bnb4_paths.py, README).
SLICE_BYTES = 32 << 20
# The Triton GEMMs (`int4_matmul: triton`) decode all of W once per 128 rows: at 96 rows they beat
# bitsandbytes' copy (forward 0.55 against 0.93 ms a 20B layer, input gradient 0.78 against 0.92),
# at 256 the forward is about even with it (the gradient 1.3x slower) and at 384 they are 1.4x
# (forward) to 1.9x (gradient) slower (bench/gpu_bnb4_paths.py kernel), so more rows (the rollout's
# scoring passes) go to the slices, the way without a whole copy.
TILED_MAX_ROWS = 256


@functools.cache
def _triton_gemm():
    """levers/int4_kernel.py where Triton is installed (CUDA builds of torch), else None."""
    try:
        from shomin.tasks.models.levers import int4_kernel
    except ImportError:
        return None
    return int4_kernel


@functools.cache
def _cuda_kernel(name: str):
    """A function of bitsandbytes' CUDA backend (>= 0.50), or None. Not public API: where it moves,
    the caller's other path runs. Used: `_gemm_4bit_kernel_impl`, the fused 4-bit GEMM (else the
    slices, or bitsandbytes' own layer), and `_dequantize_4bit_impl`, its dequantize without the
    op dispatcher's Python checks in front (else the public op), which op by op (a CUDA graph's
    warm-up and capture, the reference pass) would run once per slice."""
    try:
        from bitsandbytes.backends.cuda import ops
    except (ImportError, AttributeError):   # a build without CUDA fails inside that module
        return None
    return getattr(ops, name, None)


class Weight4bit:
    """One frozen bitsandbytes 4-bit weight as stored, read once when the layer is routed."""

    def __init__(self, param, tiled: bool = False):
        state = param.quant_state
        self.tiled = tiled   # the Triton GEMMs (int4_kernel.py) up to TILED_MAX_ROWS where they run
        self.packed, self.state = param.data.view(-1), state
        # its elementwise code lookup, made here: reading the table later would sync inside a CUDA graph
        self.lookup = int4_lookup.ptx(tuple(state.code.tolist())) if tiled and self.packed.is_cuda else ("", "")
        self.rows, self.cols = (int(d) for d in state.shape)
        self.nested = bool(state.nested)
        # a slice must start on an absmax block
        self.row_step = state.blocksize // math.gcd(state.blocksize, self.cols)

    def slices(self, itemsize: int) -> list[tuple[int, int]]:
        rows = max(self.row_step, SLICE_BYTES // (self.cols * itemsize) // self.row_step * self.row_step)
        return [(a, min(a + rows, self.rows)) for a in range(0, self.rows, rows)]

    def absmax(self) -> torch.Tensor:
        """Every block's absmax in float32 (under double quantization: bitsandbytes' blockwise
        dequantize + the offset). Made once per call for the whole weight, 1/32 of its 16-bit
        size, not per slice: at 96 rows the per-slice kernels cost more than the GEMMs saved."""
        s = self.state
        if not self.nested:
            return s.absmax.float()
        inner = s.state2
        return torch.ops.bitsandbytes.dequantize_blockwise(s.absmax, inner.absmax, inner.code, inner.blocksize,
                                                           torch.float32) + s.offset

    def dequantized(self, a: int, b: int, dtype: torch.dtype, absmax: torch.Tensor) -> torch.Tensor:
        """Rows [a, b) of W in `dtype`: bitsandbytes' dequantize on that slice of the storage."""
        s = self.state
        first, last = a * self.cols // s.blocksize, -(-b * self.cols // s.blocksize)
        packed = self.packed[a * self.cols // 2: -(-b * self.cols // 2)]
        direct = _cuda_kernel("_dequantize_4bit_impl") if packed.is_cuda else None
        if direct is None:
            return torch.ops.bitsandbytes.dequantize_4bit(packed, absmax[first:last], s.blocksize, s.quant_type,
                                                          [b - a, self.cols], dtype)
        out = torch.empty((b - a, self.cols), dtype=dtype, device=packed.device)
        direct(packed, absmax[first:last], s.blocksize, s.quant_type, dtype, out=out)
        return out

    def fused(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        s = self.state
        if not x2d.is_cuda or x2d.shape[0] > FUSED_MAX_ROWS or self.cols % s.blocksize:
            return None
        gemm = _cuda_kernel("_gemm_4bit_kernel_impl")
        if gemm is None:
            return None
        if self.nested:
            return gemm(x2d, self.packed.view(-1, 1), s.shape, s.state2.absmax, s.blocksize, s.quant_type, bias,
                        absmax_8bit=s.absmax, absmax_code=s.state2.code, absmax_offset=s.offset)
        return gemm(x2d, self.packed.view(-1, 1), s.shape, s.absmax, s.blocksize, s.quant_type, bias)

    def tiled_product(self, a2d: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor | None:
        """a2d @ W^T + bias (or, transposed, a2d @ W) through int4_kernel.py where this weight is routed
        to it and it runs for a2d, else None."""
        if not (self.tiled and a2d.is_cuda and a2d.dtype in (torch.float16, torch.bfloat16)
                and a2d.shape[0] <= TILED_MAX_ROWS):
            return None
        gemm, s = _triton_gemm(), self.state
        if gemm is None or not gemm.supported(self.cols, s.blocksize):
            return None
        return gemm.matmul(a2d, self.packed, self.absmax(), s.code, (self.rows, self.cols), s.blocksize, bias,
                           transposed=transposed, lookup=self.lookup)

    def forward(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x2d @ W^T + bias."""
        y = self.tiled_product(x2d, bias, transposed=False)
        if y is None:
            y = self.fused(x2d, bias)
        if y is not None:
            return y
        # W's row slices against x^T: each GEMM writes a contiguous block of y^T
        out_t = torch.empty((self.rows, x2d.shape[0]), dtype=x2d.dtype, device=x2d.device)
        absmax = self.absmax()
        for a, b in self.slices(x2d.element_size()):
            torch.mm(self.dequantized(a, b, x2d.dtype, absmax), x2d.t(), out=out_t[a:b])
        y = out_t.t().contiguous()
        return y if bias is None else y.add_(bias)

    def grad_input(self, grad2d: torch.Tensor) -> torch.Tensor:
        """grad2d @ W: the Triton GEMM where routed to it, else summed over W's row slices in float32."""
        grad_x = self.tiled_product(grad2d, None, transposed=True)
        if grad_x is not None:
            return grad_x
        acc, absmax = None, self.absmax()
        for a, b in self.slices(grad2d.element_size()):
            part, g = self.dequantized(a, b, grad2d.dtype, absmax), grad2d[:, a:b]
            if grad2d.is_cuda and grad2d.dtype != torch.float32:   # cuBLAS: 16-bit in, float32 out
                acc = torch.mm(g, part, out_dtype=torch.float32) if acc is None else \
                    torch.addmm(acc, g, part, out_dtype=torch.float32)
            else:
                prod = g.float() @ part.float()
                acc = prod if acc is None else acc.add_(prod)
            del part   # before the next slice is made: one slice alive at a time
        return acc.to(grad2d.dtype)


class Int4WeightLinear(torch.autograd.Function):
    """y = x @ W^T + bias with W a frozen `Weight4bit`; keeps nothing of x for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Weight4bit, bias: torch.Tensor | None):
        ctx.weight, ctx.has_bias = weight, bias is not None
        y = weight.forward(x.reshape(-1, x.shape[-1]), bias)
        return y.view(*x.shape[:-1], weight.rows)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.weight.grad_input(flat).view(*grad_out.shape[:-1], ctx.weight.cols)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat.sum(0)
        return grad_x, None, grad_bias


def _in_compute_dtype(self, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' Linear4bit contract: compute in compute_dtype and the bias follows it (the
    caller returns the result in the input's dtype)."""
    x = x.to(self.compute_dtype or x.dtype)
    if self.bias is not None and self.bias.dtype != x.dtype:
        self.bias.data = self.bias.data.to(x.dtype)
    return x


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    return Int4WeightLinear.apply(_in_compute_dtype(self, x), self._shomin_weight4bit, self.bias).to(x.dtype)


def use_sliced(model, tiled: bool = False) -> int:
    """Route every frozen bitsandbytes 4-bit linear of `model` through Int4WeightLinear; returns how many.
    `tiled`: up to TILED_MAX_ROWS the Triton GEMMs where they run, instead of the fused GEMM and the slices."""
    import bitsandbytes as bnb
    n = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or module.weight.requires_grad:
            continue
        module._shomin_weight4bit = Weight4bit(module.weight, tiled)
        target = "_old_forward" if hasattr(module, "_old_forward") else "forward"
        setattr(module, target, types.MethodType(_forward, module))
        n += 1
    return n


def _decode_forward(self, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' own layer, except that a few rows needing no gradient (a decode step) go
    through its fused GEMM whatever the shape."""
    rows = x.numel() // x.shape[-1]
    if x.is_cuda and rows <= FUSED_MAX_ROWS and not (torch.is_grad_enabled() and x.requires_grad):
        y = self._shomin_weight4bit.fused(_in_compute_dtype(self, x).reshape(rows, x.shape[-1]), self.bias)
        if y is not None:
            return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)
    return self._shomin_bnb_forward(x)


def use_fused_decode(model) -> int:
    """`int4_matmul: bitsandbytes`: keep bitsandbytes' layer but send decode steps of every frozen
    4-bit linear to its fused GEMM (on the 20B shapes 0.64 against 0.67 ms a layer and no 16-bit
    copy; its dispatcher picks it on Hopper for two of the four matrices). Returns how many."""
    import bitsandbytes as bnb
    n = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or module.weight.requires_grad:
            continue
        target = "_old_forward" if hasattr(module, "_old_forward") else "forward"
        module._shomin_weight4bit, module._shomin_bnb_forward = Weight4bit(module.weight), getattr(module, target)
        setattr(module, target, types.MethodType(_decode_forward, module))
        n += 1
    return n
