"""The CUDA path of `int4_matmul: triton` (levers/int4_weights.py): one Triton GEMM that reads
a bitsandbytes 4-bit weight as stored (two codes a byte, one float32 absmax per block) and
decodes each tile in registers, so no 16-bit copy of the weight is ever written.

bitsandbytes' own layer writes the whole 16-bit weight and reads it back per call (5 bytes a
parameter moved, against 0.5 here); its fused 4-bit GEMM avoids that but is made for a few
rows (at a PPO update's 96 rows it is 1.6x slower than the copy). Here every tile of W is
formed exactly as bitsandbytes' dequantize forms it (code[nibble] * absmax in float32,
rounded once to the activations' dtype) and fed to the tensor cores; products accumulate in
float32, so the result is the copy path's up to summation order.

Imported only where Triton is. CI checks the indexing in Triton's interpreter against
bitsandbytes' dequantize (tests/test_int4_kernel.py); bench/gpu_bnb4_paths.py times it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from shomin.tasks.models.levers.int8_kernel import _sm_count   # the other Triton GEMM's, cached per device


@triton.jit
def _decoded(byte, table, scale, dtype: tl.constexpr):
    """The two codes of each byte as bitsandbytes' dequantize forms them: code[nibble] * absmax in
    float32, rounded once to `dtype`; the high nibble holds the first (even) code. The 16-entry
    table is gathered in registers (a gather from memory per code cost 4x the whole GEMM)."""
    table = tl.broadcast_to(table[:, None], (16, byte.shape[1]))
    even = tl.gather(table, (byte >> 4).to(tl.int32), 0) * scale
    odd = tl.gather(table, (byte & 15).to(tl.int32), 0) * scale
    return even.to(dtype), odd.to(dtype)


@triton.jit
def _nf4_matmul(a_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, c_ptr, M, N, K, cols,
                stride_ah, stride_am, stride_cm, stride_cn, stride_cs, k_per_split,
                TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, QBLOCK: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C = A @ W^T (+ bias) or, TRANSPOSED, C = A @ W, with W [rows, cols] stored row-major as
    4-bit codes two to a byte (even column in the high nibble), one absmax per QBLOCK codes.
    W's even and odd columns are never interleaved in registers: the forward takes A already split
    into its even and odd columns (a_ptr + stride_ah: the odd half) and sums two GEMMs; the
    gradient keeps one accumulator per parity and writes C's columns with a stride of two.
    Tiles count bytes along W's rows (BLOCK_K forward, BLOCK_N transposed: 2x that many codes,
    within one absmax block), so each tile row has one absmax. The gradient's reduction over W's
    rows is split across program_id(2) (its outputs are few: a 6144-wide layer makes 96 tiles),
    each split writing float32 partial sums at c_ptr + split * stride_cs."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    table = tl.load(code_ptr + tl.arange(0, 16))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TRANSPOSED:   # rn: byte columns of W (2 output columns each); rk: rows of W
        acc_odd = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        first = tl.program_id(2) * k_per_split
        for k0 in range(first, tl.minimum(first + k_per_split, K), BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                        other=0.0)
            live = (rk[:, None] < K) & (rn[None, :] < N)
            byte = tl.load(packed_ptr + rk[:, None] * (cols // 2) + rn[None, :], mask=live, other=0)
            scale = tl.load(absmax_ptr + (rk * cols + pid_n * BLOCK_N * 2) // QBLOCK, mask=rk < K, other=0.0)
            even, odd = _decoded(byte, table, scale[:, None], a.dtype)
            acc += tl.dot(a, even)
            acc_odd += tl.dot(a, odd)
        out = c_ptr + tl.program_id(2) * stride_cs + rm[:, None] * stride_cm + (2 * rn[None, :]) * stride_cn
        keep = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=keep)
        tl.store(out + stride_cn, acc_odd.to(c_ptr.dtype.element_ty), mask=keep)
    else:            # rn: rows of W; rk: byte columns of W (K of them)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            at = a_ptr + rm[:, None] * stride_am + rk[None, :]
            a_live = (rm[:, None] < M) & (rk[None, :] < K)
            live = (rk[:, None] < K) & (rn[None, :] < N)
            byte = tl.load(packed_ptr + rn[None, :] * (cols // 2) + rk[:, None], mask=live, other=0)
            scale = tl.load(absmax_ptr + (rn * cols + k0 * 2) // QBLOCK, mask=rn < N, other=0.0)
            even, odd = _decoded(byte, table, scale[None, :], a_ptr.dtype.element_ty)
            acc += tl.dot(tl.load(at, mask=a_live, other=0.0), even)
            acc += tl.dot(tl.load(at + stride_ah, mask=a_live, other=0.0), odd)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def blocks(m: int, n: int, qblock: int, transposed: bool) -> dict:
    """The launch shape, measured on the 20B layers at 96 and 384 rows (H100, bench/gpu_bnb4_paths.py
    kernel), in bytes of W where a block runs along its rows. All rows in one block up to 128, so
    each weight byte is read once per 128 rows."""
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    if transposed:
        return dict(BLOCK_M=block_m, BLOCK_N=min(32, qblock // 2), BLOCK_K=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=min(32, qblock // 2), num_warps=4, num_stages=3)


def splits(tiles: int, k: int, block_k: int, device: torch.device) -> int:
    """How many ways to split the gradient's reduction: enough programs for two per SM."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(2 * sms, tiles), k // (8 * block_k)))


def supported(cols: int, qblock: int) -> bool:
    """Absmax blocks must not cross W's rows (true of every transformer width: multiples of 64)."""
    return cols % qblock == 0 and qblock >= 32


def matmul(a: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
           shape: tuple[int, int], qblock: int, bias: torch.Tensor | None, transposed: bool,
           config: dict | None = None, split: int | None = None) -> torch.Tensor:
    """a [M, cols] @ W^T (+ bias) when not transposed (the forward; W [rows, cols]);
    a [M, rows] @ W when transposed (the input's gradient, its reduction in `split` parts, by
    default `splits()`). `absmax` is float32, one per block."""
    rows, cols = shape
    m = a.shape[0]
    assert a.shape[1] == (rows if transposed else cols), (a.shape, shape, transposed)
    cfg = config or blocks(m, cols // 2 if transposed else rows, qblock, transposed)
    if transposed:
        n, k, a, stride_ah = cols // 2, rows, a.contiguous(), 0
        tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
        split = split or splits(tiles, k, cfg["BLOCK_K"], a.device)
        k_per_split = triton.cdiv(triton.cdiv(k, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        split = triton.cdiv(k, k_per_split)
        c = torch.empty((split, m, cols), dtype=torch.float32 if split > 1 else a.dtype, device=a.device)
    else:   # A's even and odd columns, each contiguous: [2, M, cols / 2] (a copy of the activations, not of W)
        n, k, split = rows, cols // 2, 1
        k_per_split = k
        a = a.reshape(m, k, 2).permute(2, 0, 1).contiguous()
        stride_ah = a.stride(0)
        c = torch.empty((1, m, rows), dtype=a.dtype, device=a.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split)
    _nf4_matmul[grid](a, packed, absmax, code, bias if bias is not None else absmax, c, m, n, k, cols,
                      stride_ah, a.stride(-2), c.stride(1), c.stride(2), c.stride(0), k_per_split,
                      TRANSPOSED=transposed, HAS_BIAS=bias is not None, QBLOCK=qblock, **cfg)
    return c[0] if split == 1 else c.sum(0, dtype=torch.float32).to(a.dtype)
