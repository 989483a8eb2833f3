"""The CUDA path of `int4_matmul: triton` (levers/int4_weights.py): Triton GEMMs that read a
bitsandbytes 4-bit weight as stored (two codes a byte, one float32 absmax per block) and
decode each tile in registers, so no 16-bit copy of the weight is ever written.

bitsandbytes' own layer writes the whole 16-bit weight and reads it back per call (5 bytes a
parameter moved, against 0.5 here); its fused 4-bit GEMM avoids that but is made for a few
rows (at a PPO update's 96 rows it is 1.6x slower than the copy). Here every tile of W is
formed exactly as bitsandbytes' dequantize forms it (code[nibble] * absmax in float32,
rounded once to the activations' dtype) and fed to the tensor cores; products accumulate in
float32, so the result is the copy path's up to summation order.

The forward computes C^T = W @ A^T: W's tile is the left operand, which Hopper's tensor cores
take from registers, so with the elementwise lookup of levers/int4_lookup.py (`lookup`) the
codes go from shared memory straight into the operand's layout. Without `lookup` (Triton's
interpreter, which runs no PTX) the table is gathered in registers: same values, slower.

Imported only where Triton is. CI checks the indexing in Triton's interpreter against
bitsandbytes' dequantize (tests/test_int4_kernel.py) and the PTX lookup against a model of its
instructions (tests/test_int4_lookup.py); bench/gpu_bnb4_paths.py times it on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from shomin.tasks.models.levers.int8_kernel import _sm_count   # the other Triton GEMM's, cached per device


@triton.jit
def _decoded(byte, code_ptr, scale, dtype: tl.constexpr, PTX_HI: tl.constexpr, PTX_LO: tl.constexpr):
    """The two codes of each byte as bitsandbytes' dequantize forms them: code[nibble] * absmax in
    float32, rounded once to `dtype`; the high nibble holds the first (even) code."""
    if PTX_HI != "":   # elementwise, four codes a call (levers/int4_lookup.py)
        even = tl.inline_asm_elementwise(PTX_HI, "=r,=r,=r,=r,r", [byte], dtype=tl.float32, is_pure=True, pack=4)
        odd = tl.inline_asm_elementwise(PTX_LO, "=r,=r,=r,=r,r", [byte], dtype=tl.float32, is_pure=True, pack=4)
    else:              # the 16-entry table gathered in registers (a gather from memory per code: 4x slower)
        table = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[:, None], (16, byte.shape[1]))
        even = tl.gather(table, (byte >> 4).to(tl.int32), 0)
        odd = tl.gather(table, (byte & 15).to(tl.int32), 0)
    return (even * scale).to(dtype), (odd * scale).to(dtype)


@triton.jit
def _forward(a_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, c_ptr, M, N, K, cols,
             stride_ah, stride_am, stride_cm, stride_cs, k_per_split,
             HAS_BIAS: tl.constexpr, QBLOCK: tl.constexpr, PTX_HI: tl.constexpr, PTX_LO: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C = A @ W^T (+ bias), with W [N rows, cols] stored row-major as 4-bit codes two to a byte
    (even column in the high nibble), one absmax per QBLOCK codes. Computed as C^T = W @ A^T.
    W's even and odd columns are never interleaved in registers: A comes split into its even and
    odd columns (a_ptr + stride_ah: the odd half, K = cols / 2 each) and two GEMMs are summed.
    BLOCK_K counts bytes along W's rows, within one absmax block, so each tile row has one
    absmax. The reduction is split across program_id(2) where W has few row tiles (float32
    partial sums at c_ptr + split * stride_cs)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    first = tl.program_id(2) * k_per_split
    for k0 in range(first, tl.minimum(first + k_per_split, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        at = a_ptr + rm[None, :] * stride_am + rk[:, None]
        a_live = (rm[None, :] < M) & (rk[:, None] < K)
        byte = tl.load(packed_ptr + rn[:, None] * (cols // 2) + rk[None, :],
                       mask=(rn[:, None] < N) & (rk[None, :] < K), other=0)
        scale = tl.load(absmax_ptr + (rn * cols + k0 * 2) // QBLOCK, mask=rn < N, other=0.0)
        even, odd = _decoded(byte, code_ptr, scale[:, None], a_ptr.dtype.element_ty, PTX_HI, PTX_LO)
        acc += tl.dot(even, tl.load(at, mask=a_live, other=0.0))
        acc += tl.dot(odd, tl.load(at + stride_ah, mask=a_live, other=0.0))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    tl.store(c_ptr + tl.program_id(2) * stride_cs + rm[None, :] * stride_cm + rn[:, None],
             acc.to(c_ptr.dtype.element_ty), mask=(rm[None, :] < M) & (rn[:, None] < N))


@triton.jit
def _gradient(a_ptr, packed_ptr, absmax_ptr, code_ptr, c_ptr, M, N, K, cols, stride_am, stride_cm, stride_cs,
              k_per_split, QBLOCK: tl.constexpr, PTX_HI: tl.constexpr, PTX_LO: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C = A @ W, W as in _forward with K rows; rn: byte columns of W (N = cols / 2, two output
    columns each). One accumulator per parity, stored with a stride of two. BLOCK_N bytes stay
    within one absmax block. The reduction over W's rows is split across program_id(2) (the
    outputs are few: a 6144-wide layer makes 96 tiles), float32 partials as in _forward."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_odd = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = tl.program_id(2) * k_per_split
    for k0 in range(first, tl.minimum(first + k_per_split, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)
        byte = tl.load(packed_ptr + rk[:, None] * (cols // 2) + rn[None, :],
                       mask=(rk[:, None] < K) & (rn[None, :] < N), other=0)
        scale = tl.load(absmax_ptr + (rk * cols + pid_n * BLOCK_N * 2) // QBLOCK, mask=rk < K, other=0.0)
        even, odd = _decoded(byte, code_ptr, scale[:, None], a.dtype, PTX_HI, PTX_LO)
        acc += tl.dot(a, even)
        acc_odd += tl.dot(a, odd)
    out = c_ptr + tl.program_id(2) * stride_cs + rm[:, None] * stride_cm + 2 * rn[None, :]
    keep = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=keep)
    tl.store(out + 1, acc_odd.to(c_ptr.dtype.element_ty), mask=keep)


def blocks(m: int, qblock: int, transposed: bool) -> dict:
    """The launch shape, measured on the 20B layers at 96 rows (H100, bench/gpu_bnb4_paths.py
    kernel), in bytes of W where a block runs along its rows. All rows in one block up to 128, so
    each weight byte is read once per 128 rows."""
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    if transposed:
        return dict(BLOCK_M=block_m, BLOCK_N=min(32, qblock // 2), BLOCK_K=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=min(32, qblock // 2), num_warps=4, num_stages=3)


def _sms(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def forward_splits(tiles: int, k: int, block_k: int, device: torch.device) -> int:
    """How many ways to split the forward's reduction: the fewest (each costs a float32 partial
    of C) that share the tiles out to the SMs within 10% of evenly. At 96 rows on an H100: a
    6144-row layer (96 tiles) 4, an 18432-row one 3, a 24576-row one none."""
    if device.type != "cuda":
        return 1
    sms = _sms(device)
    for split in range(1, 5):
        waves = tiles * split / sms
        if -(-tiles * split // sms) / waves <= 1.10 or k // (split + 1) < 4 * block_k:
            return split
    return 4


def splits(tiles: int, k: int, block_k: int, device: torch.device) -> int:
    """How many ways to split the gradient's reduction: enough programs for two per SM."""
    if device.type != "cuda":
        return 1
    return max(1, min(triton.cdiv(2 * _sms(device), tiles), k // (8 * block_k)))


def supported(cols: int, qblock: int) -> bool:
    """Absmax blocks must not cross W's rows (true of every transformer width: multiples of 64)."""
    return cols % qblock == 0 and qblock >= 32


def matmul(a: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
           shape: tuple[int, int], qblock: int, bias: torch.Tensor | None, transposed: bool,
           config: dict | None = None, split: int | None = None, lookup: tuple[str, str] = ("", "")) -> torch.Tensor:
    """a [M, cols] @ W^T (+ bias) when not transposed (the forward; W [rows, cols]);
    a [M, rows] @ W when transposed (the input's gradient). The reduction goes in `split` parts
    (by default forward_splits() / splits()). `absmax` is float32, one per block; `lookup`:
    levers/int4_lookup.ptx(code) on a GPU, empty under Triton's interpreter."""
    rows, cols = shape
    m = a.shape[0]
    assert a.shape[1] == (rows if transposed else cols), (a.shape, shape, transposed)
    cfg = config or blocks(m, qblock, transposed)
    if transposed:
        n, k, width = cols // 2, rows, cols
        a = a.contiguous()
    else:   # A's even and odd columns, each contiguous: [2, M, cols / 2] (a copy of the activations, not of W)
        n, k, width = rows, cols // 2, rows
        a = a.reshape(m, k, 2).permute(2, 0, 1).contiguous()
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    split = split or (splits if transposed else forward_splits)(tiles, k, cfg["BLOCK_K"], a.device)
    k_per_split = triton.cdiv(triton.cdiv(k, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split = triton.cdiv(k, k_per_split)
    c = torch.empty((split, m, width), dtype=torch.float32 if split > 1 else a.dtype, device=a.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split)
    ptx = dict(PTX_HI=lookup[0], PTX_LO=lookup[1])
    if transposed:
        _gradient[grid](a, packed, absmax, code, c, m, n, k, cols, a.stride(0), c.stride(1), c.stride(0),
                        k_per_split, QBLOCK=qblock, **ptx, **cfg)
    else:
        in_kernel = bias is not None and split == 1
        _forward[grid](a, packed, absmax, code, bias if in_kernel else absmax, c, m, n, k, cols,
                       a.stride(0), a.stride(1), c.stride(1), c.stride(0), k_per_split,
                       HAS_BIAS=in_kernel, QBLOCK=qblock, **ptx, **cfg)
    if split == 1:
        return c[0]
    out = c.sum(0, dtype=torch.float32)
    return (out if transposed or bias is None else out.add_(bias)).to(a.dtype)
