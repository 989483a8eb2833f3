"""The CUDA path of levers/int8_weights.py: one Triton GEMM that reads the int8 weight as
stored and dequantizes each tile in registers, so the 16-bit weight never exists in memory.

A 20B model's weights are 20 GB in int8 and 40 GB in 16 bits: writing the 16-bit copy and
reading it back (the portable path) moves 5 bytes a parameter per pass, this kernel 1. At
the token counts of RL (16 to a few hundred rows) the GEMM is bound by that traffic.

Imported only where CUDA and Triton are (CI has neither): bench/gpu_check_kernels.py checks
it against the portable path and the fp16 model on the GPU.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _w8_matmul(a_ptr, w_ptr, s_ptr, bias_ptr, c_ptr, M, N, K,
               stride_am, stride_ak, stride_wk, stride_wn, stride_cm, stride_cn,
               SCALE_ON_N: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[M, N] = A[M, K] @ B[K, N] (+ bias[N]), B[k, n] = w[k, n] * s[n or k] rounded to A's
    dtype, as the portable path rounds it; the products accumulate in float32."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SCALE_ON_N:
        s_n = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + kk[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0)
        if SCALE_ON_N:
            b = (w.to(tl.float32) * s_n[None, :]).to(a.dtype)
        else:
            s_k = tl.load(s_ptr + kk, mask=kk < K, other=0.0)
            b = (w.to(tl.float32) * s_k[:, None]).to(a.dtype)
        acc += tl.dot(a, b)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _blocks(m: int, n: int, device: torch.device) -> tuple[int, int]:
    # All rows in one block up to 128 (the weight is then read once); narrower column blocks
    # when there would be too few of them to keep every SM streaming.
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    block_n = 64 if triton.cdiv(n, 64) * triton.cdiv(m, block_m) >= 2 * sms else 32
    return block_m, block_n


def matmul(a: torch.Tensor, cb: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
           transposed: bool) -> torch.Tensor:
    """a [M, K] @ W^T (+ bias) when not transposed (the forward: W = cb * scale, [out, in]);
    a [M, out] @ W when transposed (the input's gradient)."""
    m = a.shape[0]
    n = cb.shape[1] if transposed else cb.shape[0]
    k = a.shape[1]
    c = torch.empty((m, n), dtype=a.dtype, device=a.device)
    block_m, block_n = _blocks(m, n, a.device)
    # B[k, n] = cb[n, k] (forward) or cb[k, n] (gradient); the scale goes with cb's row
    stride_wk, stride_wn = (cb.stride(0), cb.stride(1)) if transposed else (cb.stride(1), cb.stride(0))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w8_matmul[grid](a, cb, scale, bias if bias is not None else scale, c, m, n, k,
                     a.stride(0), a.stride(1), stride_wk, stride_wn, c.stride(0), c.stride(1),
                     SCALE_ON_N=not transposed, HAS_BIAS=bias is not None,
                     BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, num_warps=4, num_stages=4)
    return c
