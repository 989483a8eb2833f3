"""Experiment: the two ways bitsandbytes (>= 0.50) multiplies by a 4-bit weight, and a sliced
input gradient, timed on the 20B layer shapes at a rollout's and an update's row counts.

bitsandbytes' `gemm_4bit` op picks, per GPU and shape, between its own fused kernel (the
codes decoded in registers, no 16-bit copy of the weight) and "dequantize the whole weight
to 16 bits, then cuBLAS" (fast, but the copy, 0.28 GiB for a 20B MLP matrix, adds to the
peak). On Hopper it picks the copy for most of these shapes. This times both, forced, and
the input's gradient g @ W three ways: bitsandbytes' backward (the whole weight dequantized),
and in row slices of at most 64 or 32 MiB, each dequantized and added into the gradient.
One JSON line per (shape, rows). CUDA and bitsandbytes >= 0.50 needed.
Usage: python bench/gpu_bnb4_paths.py
"""
from __future__ import annotations

import json

import torch

SHAPES = {"query_key_value": (18432, 6144), "dense": (6144, 6144), "dense_h_to_4h": (24576, 6144),
          "dense_4h_to_h": (6144, 24576)}


def timed(fn, reps=50) -> float:
    """ms per call, replayed as a CUDA graph (the PPO stage replays both phases)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / reps, 4)


def main():
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from bitsandbytes.backends.cuda import ops as cuda_ops
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                compress_statistics=True).cuda()
        w, qs = lin.weight, lin.weight.quant_state
        args = (w.data.view(-1, 1), qs.shape, qs.state2.absmax, qs.blocksize, qs.quant_type)
        kw = dict(absmax_8bit=qs.absmax, absmax_code=qs.state2.code, absmax_offset=qs.offset)
        absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        dense = bnbf.dequantize_4bit(w.data, qs).to(torch.bfloat16)
        for m in (16, 96):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            ref_y, ref_gx = x @ dense.t(), g @ dense
            fused = lambda: cuda_ops._gemm_4bit_kernel_impl(x, *args, None, **kw)  # noqa: E731
            copy = lambda: cuda_ops._dequant_linear_fallback(x, *args, None, **kw)  # noqa: E731
            whole_grad = lambda: g @ bnbf.dequantize_4bit(w.data, qs).to(torch.bfloat16)  # noqa: E731

            def sliced_grad(mib):
                rows = max(1, (mib << 20) // (k * 2))
                packed = w.data.view(-1)

                def run():
                    out = torch.zeros(m, k, device="cuda", dtype=torch.bfloat16)
                    for a in range(0, n, rows):
                        b = min(n, a + rows)
                        part = torch.ops.bitsandbytes.dequantize_4bit(
                            packed[a * k // 2: b * k // 2], absmax[a * k // 64: b * k // 64], 64, "nf4", [b - a, k],
                            torch.bfloat16)
                        out.addmm_(g[:, a:b], part)
                    return out
                return run
            def sliced_fwd(mib, transposed):
                rows = max(1, (mib << 20) // (k * 2))
                packed = w.data.view(-1)

                def part(a, b):
                    return torch.ops.bitsandbytes.dequantize_4bit(
                        packed[a * k // 2: b * k // 2], absmax[a * k // 64: b * k // 64], 64, "nf4", [b - a, k],
                        torch.bfloat16)

                def run():
                    if transposed:   # y^T row slices: each GEMM writes a contiguous block
                        yt = torch.empty(n, m, device="cuda", dtype=torch.bfloat16)
                        for a in range(0, n, rows):
                            b = min(n, a + rows)
                            torch.mm(part(a, b), x.t(), out=yt[a:b])
                        return yt.t().contiguous()
                    return torch.cat([x @ part(a, min(n, a + rows)).t() for a in range(0, n, rows)], -1)
                return run

            def grad32(mib):
                rows = max(1, (mib << 20) // (k * 2))
                packed = w.data.view(-1)

                def run():
                    out = torch.zeros(m, k, device="cuda", dtype=torch.float32)
                    for a in range(0, n, rows):
                        b = min(n, a + rows)
                        part = torch.ops.bitsandbytes.dequantize_4bit(
                            packed[a * k // 2: b * k // 2], absmax[a * k // 64: b * k // 64], 64, "nf4", [b - a, k],
                            torch.bfloat16)
                        out = torch.addmm(out, g[:, a:b], part, out_dtype=torch.float32)
                    return out.to(torch.bfloat16)
                return run
            rel = lambda a, b: round(((a.float() - b.float()).norm() / b.float().norm()).item(), 5)  # noqa: E731
            line = {"layer": name, "shape": [n, k], "rows": m,
                    "heuristic_picks_fused": bool(cuda_ops._gemm_4bit_use_custom_cuda(0, torch.bfloat16, m, n, k)),
                    "fwd_fused_ms": timed(fused), "fwd_copy_ms": timed(copy),
                    "fwd_fused_err": rel(fused(), ref_y), "fwd_copy_err": rel(copy(), ref_y),
                    "grad_whole_ms": timed(whole_grad)}
            for mib in (64, 32):
                run = sliced_grad(mib)
                line[f"grad_sliced{mib}_ms"] = timed(run)
                line[f"grad_sliced{mib}_err"] = rel(run(), ref_gx)
            for mib in (32, 16):
                for tr in (False, True):
                    run = sliced_fwd(mib, tr)
                    key = f"fwd_sliced{mib}{'_t' if tr else ''}"
                    line[key + "_ms"] = timed(run)
                    line[key + "_err"] = rel(run(), ref_y)
            try:
                run = grad32(32)
                line["grad_sliced32_f32acc_ms"] = timed(run)
                line["grad_sliced32_f32acc_err"] = rel(run(), ref_gx)
            except Exception as e:   # noqa: BLE001 - an older torch without out_dtype
                line["grad_sliced32_f32acc_ms"] = str(e).splitlines()[0][:120]
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fused()
            line["fwd_fused_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
            torch.cuda.reset_peak_memory_stats()
            copy()
            line["fwd_copy_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
            print(json.dumps(line), flush=True)
        del lin, dense


if __name__ == "__main__":
    main()
