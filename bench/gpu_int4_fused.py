"""Experiment, not used by shomin: can one Triton GEMM that reads bitsandbytes' 4-bit weights
as stored beat bitsandbytes' own Linear4bit (dequantize the whole weight to 16 bits, then
cuBLAS) at the row counts of PPO on the 20B shape? It would also remove the 16-bit copy
(0.28 GiB for one MLP matrix) from the stage's peak. CUDA needed.

The kernel decodes each tile in registers (two codes a byte, one absmax per 64 weights, the
absmax itself 8-bit under double quantization), splits the reduction so every SM streams
weights, and multiplies with tl.dot. To see where its time goes, VARIANT swaps one part:
  0  the 16-value code table looked up in memory (L1) per weight: the real kernel
  4  the table held in registers, looked up with tl.gather: the real kernel
  5  the table as a tree of selects on the code's bits: the real kernel
  1  no lookup at all (the code's number times the absmax): wrong values, a speed bound
  2  lookup but no tl.dot (column sums instead): the decode's own cost
  3  the loads only
Per layer matrix, rows (16: a rollout; 96: an update mini-batch) and direction (the forward
x @ W^T; grad: the input's gradient g @ W), one JSON line: bitsandbytes' dequantize and cuBLAS
times, then each variant's time per block configuration [block_m, block_n, block_k, split_k,
warps, stages], and the largest difference of the real variants from the product with
bitsandbytes' own dequantized weight.
Usage: python bench/gpu_int4_fused.py > bench/results_int4_fused.jsonl
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

BLOCKSIZE = 64   # the absmax block this kernel reads: bitsandbytes' default for 4-bit weights


@triton.jit
def _scales(absmax_ptr, code2_ptr, absmax2_ptr, offset, block, ok, BLOCK2, NESTED: tl.constexpr):
    """The float32 absmax of absmax-blocks `block` (double quantization: an 8-bit code, its
    table, one float scale per BLOCK2 of them, and the mean added back)."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
        s = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCK2, mask=ok, other=0.0) + offset
    else:
        s = tl.load(absmax_ptr + block, mask=ok, other=0.0)
    return s.to(tl.float32)


@triton.jit
def _tree(nib, code_ptr):
    c0, c1, c2, c3 = tl.load(code_ptr), tl.load(code_ptr + 1), tl.load(code_ptr + 2), tl.load(code_ptr + 3)
    c4, c5, c6, c7 = tl.load(code_ptr + 4), tl.load(code_ptr + 5), tl.load(code_ptr + 6), tl.load(code_ptr + 7)
    c8, c9, c10, c11 = tl.load(code_ptr + 8), tl.load(code_ptr + 9), tl.load(code_ptr + 10), tl.load(code_ptr + 11)
    c12, c13, c14, c15 = tl.load(code_ptr + 12), tl.load(code_ptr + 13), tl.load(code_ptr + 14), tl.load(code_ptr + 15)
    b0, b1, b2, b3 = (nib & 1) != 0, (nib & 2) != 0, (nib & 4) != 0, (nib & 8) != 0
    l0 = tl.where(b1, tl.where(b0, c3, c2), tl.where(b0, c1, c0))
    l1 = tl.where(b1, tl.where(b0, c7, c6), tl.where(b0, c5, c4))
    l2 = tl.where(b1, tl.where(b0, c11, c10), tl.where(b0, c9, c8))
    l3 = tl.where(b1, tl.where(b0, c15, c14), tl.where(b0, c13, c12))
    return tl.where(b3, tl.where(b2, l3, l2), tl.where(b2, l1, l0))


@triton.jit
def _decode(packed, s, code_ptr, a, VARIANT: tl.constexpr):
    """The high and low codes of each byte times their absmax `s`, in a's dtype, as VARIANT says."""
    if VARIANT == 1:
        hi = ((packed >> 4).to(tl.float32) * s).to(a.dtype)
        lo = ((packed & 0xF).to(tl.float32) * s).to(a.dtype)
    elif VARIANT == 4:
        table = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[:, None], (16, packed.shape[1]))
        hi = (tl.gather(table, (packed >> 4).to(tl.int32), 0) * s).to(a.dtype)
        lo = (tl.gather(table, (packed & 0xF).to(tl.int32), 0) * s).to(a.dtype)
    elif VARIANT == 5:
        hi = (_tree(packed >> 4, code_ptr) * s).to(a.dtype)
        lo = (_tree(packed & 0xF, code_ptr) * s).to(a.dtype)
    else:
        hi = (tl.load(code_ptr + (packed >> 4)) * s).to(a.dtype)
        lo = (tl.load(code_ptr + (packed & 0xF)) * s).to(a.dtype)
    return hi, lo


@triton.jit
def _w4_matmul(a_ptr, q_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset, c_ptr,
               M, N, K, W_COLS, BLOCK2,
               stride_am, stride_ak, stride_cs, stride_cm, stride_cn,
               STEPS: tl.constexpr, TRANSPOSED: tl.constexpr, NESTED: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VARIANT: tl.constexpr = 0):
    """C[s, M, N] = A[M, Ks] @ B[Ks, N] over the s-th slice Ks of the reduction, with B = W^T
    (the forward) or W (TRANSPOSED: the input's gradient). W is [rows, W_COLS] row-major;
    element f = row * W_COLS + col is in byte f // 2 (even f in the high nibble) and equals
    code[nibble] * absmax[f // 64].

    A byte holds two neighbours along a weight row. Forward: the row runs along K, so A's even
    and odd columns (one contiguous load, split in registers) meet the high and low nibbles in
    two dots, and a BLOCK_K of 64 is one absmax per weight row. Gradient: the row runs along N,
    so the high and low nibbles make C's even and odd columns, and a BLOCK_N of 64 is again one
    absmax per weight row."""
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_lo = pid_s * STEPS * BLOCK_K   # the last slice may run past K: masked
    half_cols = W_COLS // 2
    a_rows = a_ptr + rm[:, None].to(tl.int64) * stride_am
    if TRANSPOSED:   # C[:, 2j] and C[:, 2j + 1] from the high and low nibbles of byte column j
        rj = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        rk = tl.arange(0, BLOCK_K)
        acc_hi = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
        acc_lo = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
        for step in range(0, STEPS):
            k0 = k_lo + step * BLOCK_K
            kk = k0 + rk
            k_ok = kk < K
            a = tl.load(a_rows + kk[None, :] * stride_ak, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
            packed = tl.load(q_ptr + kk[:, None].to(tl.int64) * half_cols + rj[None, :],
                             mask=k_ok[:, None] & (rj[None, :] < half_cols), other=0)
            s = _scales(absmax_ptr, code2_ptr, absmax2_ptr, offset,
                        (kk.to(tl.int64) * W_COLS + pid_n * BLOCK_N) // 64, k_ok, BLOCK2, NESTED)[:, None]
            hi, lo = _decode(packed, s, code_ptr, a, VARIANT)
            if VARIANT == 3:
                acc_hi += tl.sum(packed.to(tl.float32), 0)[None, :]
            elif VARIANT == 2:
                acc_hi += tl.sum(hi.to(tl.float32), 0)[None, :]
                acc_lo += tl.sum(lo.to(tl.float32), 0)[None, :]
            else:
                acc_hi += tl.dot(a, hi)
                acc_lo += tl.dot(a, lo)
        acc = tl.reshape(tl.join(acc_hi, acc_lo), (BLOCK_M, BLOCK_N))   # interleave: 2j, 2j + 1
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    else:            # B[k, n] = W[n, k]
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rj = tl.arange(0, BLOCK_K // 2)
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, STEPS):
            k0 = k_lo + step * BLOCK_K
            a = tl.load(a_rows + (k0 + rk)[None, :] * stride_ak,
                        mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
            a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))
            kj = k0 // 2 + rj                     # byte column
            packed = tl.load(q_ptr + rn[None, :].to(tl.int64) * half_cols + kj[:, None],
                             mask=n_ok[None, :] & (2 * kj[:, None] < K), other=0)   # [bytes, n]
            s = _scales(absmax_ptr, code2_ptr, absmax2_ptr, offset,
                        (rn.to(tl.int64) * W_COLS + k0) // 64, n_ok, BLOCK2, NESTED)[None, :]
            hi, lo = _decode(packed, s, code_ptr, a, VARIANT)
            if VARIANT == 3:
                acc += tl.sum(packed.to(tl.float32), 0)[None, :]
            elif VARIANT == 2:
                acc += tl.sum(hi.to(tl.float32) + lo.to(tl.float32), 0)[None, :]
            else:
                acc += tl.dot(a_even, hi)
                acc += tl.dot(a_odd, lo)
    out = c_ptr + pid_s * stride_cs + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


class Config(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pick(m: int, n: int, k: int, sms: int) -> Config:
    """Blocks of 64 along the weight row (one absmax each); all rows in one block up to 128 (the
    weight is read once); the reduction split until there are about two programs an SM."""
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 64)
    steps = triton.cdiv(k, 64)
    split = max(1, min(steps // 4, triton.cdiv(2 * sms, tiles)))   # >= 4 steps a slice
    return Config(block_m, 64, 64, split)


def matmul(a, packed, layout, transposed: bool, config: Config | None = None, variant: int = 0) -> torch.Tensor:
    """a [M, in] @ W^T when not transposed (the forward; W is [out, in] = layout.shape);
    a [M, out] @ W when transposed (the input's gradient). `layout` is this file's Layout."""
    rows, cols = layout.shape
    assert layout.blocksize == BLOCKSIZE and cols % BLOCKSIZE == 0, "absmax blocks of 64 within a weight row"
    m, k = a.shape
    n = cols if transposed else rows
    if config is None:
        sms = _sm_count(a.device.index or 0) if a.is_cuda else 4
        config = pick(m, n, k, sms)
    steps_per_split = triton.cdiv(triton.cdiv(k, config.block_k), config.split_k)
    k_per_split = steps_per_split * config.block_k
    splits = triton.cdiv(k, k_per_split)
    c = torch.empty((splits, m, n), dtype=a.dtype if splits == 1 else torch.float32, device=a.device)
    nested = layout.code2 is not None
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), splits)
    _w4_matmul[grid](a, packed, layout.code, layout.absmax, layout.code2 if nested else layout.code,
                     layout.absmax2 if nested else layout.absmax, layout.offset, c,
                     m, n, k, cols, layout.block2,
                     a.stride(0), a.stride(1), c.stride(0), c.stride(1), c.stride(2),
                     STEPS=steps_per_split, TRANSPOSED=transposed, NESTED=nested,
                     BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                     num_warps=config.num_warps, num_stages=config.num_stages, VARIANT=variant)
    return c[0] if splits == 1 else c.sum(0).to(a.dtype)



@dataclass(frozen=True)
class Layout:
    """One frozen 4-bit weight as stored (the double-quantization offset read once)."""
    shape: tuple
    blocksize: int
    code: torch.Tensor
    absmax: torch.Tensor
    code2: torch.Tensor | None
    absmax2: torch.Tensor | None
    block2: int
    offset: float

    @classmethod
    def of(cls, weight) -> "Layout":
        s = weight.quant_state
        n = s.nested
        return cls(tuple(s.shape), s.blocksize, s.code.float(), s.absmax, s.state2.code if n else None,
                   s.state2.absmax if n else None, s.state2.blocksize if n else 1, float(s.offset) if n else 0.0)


def main() -> None:
    import bitsandbytes as bnb
    from triton.testing import do_bench
    torch.manual_seed(0)
    sms = _sm_count(0)
    for name, (out_f, in_f) in {"query_key_value": (18432, 6144), "dense_4h_to_h": (6144, 24576)}.items():
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                  compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(torch.randn(out_f, in_f, dtype=torch.bfloat16) * 0.02, requires_grad=False,
                                         quant_type="nf4", compress_statistics=True)
        layer = layer.cuda()
        packed, layout, state = layer.weight.data, Layout.of(layer.weight), layer.weight.quant_state
        w = bnb.functional.dequantize_4bit(packed, state)   # bf16, as Linear4bit makes it
        for m in (16, 96):
            for grad in (False, True):
                k, n = (out_f, in_f) if grad else (in_f, out_f)
                a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                want = (a @ w) if grad else (a @ w.T)
                row = {"layer": name, "rows": m, "grad": grad,
                       "bnb_dequantize_ms": round(do_bench(lambda: bnb.functional.dequantize_4bit(packed, state)), 4),
                       "cublas_ms": round(do_bench(lambda: (a @ w) if grad else (a @ w.T)), 4), "ms": {}, "max_abs_diff": {}}
                p = pick(m, n, k, sms)
                configs = (p, Config(p.block_m, 64 if grad else 32, 128 if grad else 64, p.split_k * 2, 8, 3),
                           Config(min(p.block_m, 64), 64, 64, p.split_k, 4, 4))
                for cfg in configs:
                    for v in (0, 4, 5, 1, 2, 3):
                        if v in (0, 4, 5):
                            got = matmul(a, packed, layout, grad, cfg, v)
                            row["max_abs_diff"][f"v{v}"] = max(row["max_abs_diff"].get(f"v{v}", 0.0),
                                                               (got.float() - want.float()).abs().max().item())
                        row["ms"][f"{list(cfg)} v{v}"] = round(do_bench(lambda: matmul(a, packed, layout, grad, cfg, v),
                                                                        warmup=5, rep=30), 4)
                row["best_real_ms"] = min(t for c, t in row["ms"].items() if c.endswith(("v0", "v4", "v5")))
                row["bnb_ms"] = round(row["bnb_dequantize_ms"] + row["cublas_ms"], 4)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
