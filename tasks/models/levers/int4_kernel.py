"""The CUDA path of levers/int4_weights.py: one Triton GEMM that reads a bitsandbytes 4-bit
weight as stored (two 4-bit codes a byte, one absmax per 64 weights, the absmax itself
8-bit under double quantization) and dequantizes each tile in registers.

bitsandbytes' own 4-bit layer writes the whole 16-bit weight (302 MB for one MLP matrix of a
20B model), then a GEMM reads it back: 4.5 bytes of traffic a parameter per pass, and the
copy adds to the peak. Here 0.5 bytes a parameter move and no copy exists. At the token
counts of RL (rollouts and update mini-batches of tens to hundreds of rows) that traffic is
the GEMM's cost.

Imported only where CUDA and Triton are (CI has neither): bench/gpu_check_kernels.py checks
it against bitsandbytes' dequantize-then-GEMM on the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from shomin.tasks.models.levers.int8_kernel import _sm_count

BLOCKSIZE = 64   # the absmax block this kernel reads; bitsandbytes' default for 4-bit weights


@triton.jit
def _lut(nib, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15):
    """code[nib] for 4-bit codes, as a tree of selects on the code's bits: in registers, with the
    16 values read once per program rather than gathered from memory for every weight."""
    b0, b1, b2, b3 = (nib & 1) != 0, (nib & 2) != 0, (nib & 4) != 0, (nib & 8) != 0
    l0 = tl.where(b1, tl.where(b0, c3, c2), tl.where(b0, c1, c0))
    l1 = tl.where(b1, tl.where(b0, c7, c6), tl.where(b0, c5, c4))
    l2 = tl.where(b1, tl.where(b0, c11, c10), tl.where(b0, c9, c8))
    l3 = tl.where(b1, tl.where(b0, c15, c14), tl.where(b0, c13, c12))
    return tl.where(b3, tl.where(b2, l3, l2), tl.where(b2, l1, l0))


@triton.jit
def _absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, block, ok, BLOCK2, NESTED: tl.constexpr):
    if NESTED:   # double quantization: the absmax is 8-bit, with one float scale per BLOCK2 of them
        s = tl.load(code2_ptr + tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)) \
            * tl.load(absmax2_ptr + block // BLOCK2, mask=ok, other=0.0).to(tl.float32) + offset
    else:
        s = tl.load(absmax_ptr + block, mask=ok, other=0.0).to(tl.float32)
    return s


@triton.jit
def _w4_matmul(a_ptr, q_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset, bias_ptr, c_ptr,
               M, N, K, W_COLS, BLOCK2,
               stride_am, stride_ak, stride_cm, stride_cn,
               TRANSPOSED: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[M, N] = A[M, K] @ B[K, N] (+ bias[N]) with B = W^T (the forward) or W (TRANSPOSED: the
    input's gradient); W is [rows, W_COLS] row-major, element f = row * W_COLS + col stored in
    byte f // 2 (even f in the high nibble) as code[nibble] * absmax[f // 64].

    A byte holds two neighbours along a weight row, so the tile is never interleaved: in the
    forward the weight row runs along K, and A's even and odd columns meet the high and low
    nibbles in two dots; in the gradient it runs along N, and the high and low nibbles make
    C's even and odd columns. The 64 weights of one absmax block lie along the row, so a tile
    needs one absmax per weight row. As bitsandbytes does, each weight is formed in float32
    and rounded once to A's dtype; the products accumulate in float32."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    c0, c1, c2, c3 = tl.load(code_ptr), tl.load(code_ptr + 1), tl.load(code_ptr + 2), tl.load(code_ptr + 3)
    c4, c5, c6, c7 = tl.load(code_ptr + 4), tl.load(code_ptr + 5), tl.load(code_ptr + 6), tl.load(code_ptr + 7)
    c8, c9, c10, c11 = tl.load(code_ptr + 8), tl.load(code_ptr + 9), tl.load(code_ptr + 10), tl.load(code_ptr + 11)
    c12, c13, c14, c15 = tl.load(code_ptr + 12), tl.load(code_ptr + 13), tl.load(code_ptr + 14), tl.load(code_ptr + 15)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    half_cols = W_COLS // 2
    if TRANSPOSED:   # C[:, 2j] and C[:, 2j + 1] from the high and low nibbles of byte column j
        rj = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        rk = tl.arange(0, BLOCK_K)
        acc_hi = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
        acc_lo = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            packed = tl.load(q_ptr + kk[:, None].to(tl.int64) * half_cols + rj[None, :],
                             mask=(kk[:, None] < K) & (rj[None, :] < half_cols), other=0)
            s = _absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset,
                        (kk.to(tl.int64) * W_COLS + pid_n * BLOCK_N) // 64, kk < K, BLOCK2, NESTED)[:, None]
            hi = (_lut((packed >> 4) & 0xF, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)
                  * s).to(a.dtype)
            lo = (_lut(packed & 0xF, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)
                  * s).to(a.dtype)
            acc_hi += tl.dot(a, hi)
            acc_lo += tl.dot(a, lo)
        out = c_ptr + rm[:, None] * stride_cm + (2 * rj)[None, :] * stride_cn
        ok = (rm[:, None] < M) & (2 * rj[None, :] < N)
        tl.store(out, acc_hi.to(c_ptr.dtype.element_ty), mask=ok)
        tl.store(out + stride_cn, acc_lo.to(c_ptr.dtype.element_ty), mask=ok)
    else:            # B[k, n] = W[n, k]: A's even/odd columns against the high/low nibbles
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = tl.arange(0, BLOCK_K // 2)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kj = k0 // 2 + rj                     # byte column
            a_row = a_ptr + rm[:, None] * stride_am
            a_ok = (rm[:, None] < M) & (2 * kj[None, :] < K)
            a_hi = tl.load(a_row + (2 * kj)[None, :] * stride_ak, mask=a_ok, other=0.0)
            a_lo = tl.load(a_row + (2 * kj + 1)[None, :] * stride_ak, mask=a_ok, other=0.0)
            packed = tl.load(q_ptr + rn[None, :].to(tl.int64) * half_cols + kj[:, None],
                             mask=(rn[None, :] < N) & (kj[:, None] < half_cols), other=0)   # [bytes, n]
            s = _absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset,
                        (rn.to(tl.int64) * W_COLS + k0) // 64, rn < N, BLOCK2, NESTED)[None, :]
            hi = (_lut((packed >> 4) & 0xF, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)
                  * s).to(a_hi.dtype)
            lo = (_lut(packed & 0xF, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)
                  * s).to(a_hi.dtype)
            acc += tl.dot(a_hi, hi)
            acc += tl.dot(a_lo, lo)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul(a: torch.Tensor, packed: torch.Tensor, layout, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """a [M, in] @ W^T (+ bias) when not transposed (the forward; W is [out, in] = layout.shape);
    a [M, out] @ W when transposed (the input's gradient). `layout` is int4_weights.Layout: the
    weight's code table and absmax (nested or not); its blocksize must be BLOCKSIZE and `in` a
    multiple of it (supported() says)."""
    rows, cols = layout.shape
    m, k = a.shape
    n = cols if transposed else rows
    c = torch.empty((m, n), dtype=a.dtype, device=a.device)
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    if transposed:
        block_n, block_k = BLOCKSIZE, 64
    else:   # narrower column blocks when there would be too few to keep every SM streaming
        sms = _sm_count(a.device.index if a.device.index is not None else torch.cuda.current_device())
        block_n = 64 if triton.cdiv(n, 64) * triton.cdiv(m, block_m) >= 2 * sms else 32
        block_k = BLOCKSIZE
    nested = layout.code2 is not None
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w4_matmul[grid](a, packed, layout.code, layout.absmax, layout.code2 if nested else layout.code,
                     layout.absmax2 if nested else layout.absmax, layout.offset,
                     bias if bias is not None else a, c,
                     m, n, k, cols, layout.block2, a.stride(0), a.stride(1), c.stride(0), c.stride(1),
                     TRANSPOSED=transposed, NESTED=nested, HAS_BIAS=bias is not None,
                     BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=4)
    return c


def supported(layout) -> bool:
    return layout.blocksize == BLOCKSIZE and layout.shape[1] % BLOCKSIZE == 0
