"""Experiment: the two ways bitsandbytes (>= 0.50) multiplies by a 4-bit weight, and a sliced
input gradient, timed on the 20B layer shapes at a rollout's and an update's row counts.

bitsandbytes' `gemm_4bit` op picks, per GPU and shape, between its own fused kernel (the
codes decoded in registers, no 16-bit copy of the weight) and "dequantize the whole weight
to 16 bits, then cuBLAS" (fast, but the copy, 0.28 GiB for a 20B MLP matrix, adds to the
peak). On Hopper it picks the copy for most of these shapes. This times both, forced, and
the input's gradient g @ W three ways: bitsandbytes' backward (the whole weight dequantized),
and in row slices of at most 64 or 32 MiB, each dequantized and added into the gradient.
One JSON line per (shape, rows). CUDA and bitsandbytes >= 0.50 needed. The layers are made in
bf16 before quantizing, as a bf16 model's are: bitsandbytes dequantizes to the dtype the weight
was quantized from (in float32 its backward's copy is twice the bytes).
`layers`: the four matrices of LAYERS distinct layers in a row (so no weight is still in L2
when it is read again, as in a model), bitsandbytes' own (its dispatcher's forward, its
backward's whole dequantize) against shomin's `int4_matmul: sliced` (levers/int4_weights.py).
`kernel`: shomin's Triton 4-bit GEMM (levers/int4_kernel.py, `int4_matmul: triton`) against
bitsandbytes' copy path and fused GEMM, forward and input gradient, at 16, 96, 256 and 384 rows
(its absmax also made per call, as the layer does), with its error against the dense product and a sweep of launch shapes (the best is printed
beside the heuristic's).
Usage: python bench/gpu_bnb4_paths.py [layers|autograd|kernel [sweep]]
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


def bf16_layer(n: int, k: int):
    """A double-quantized bitsandbytes 4-bit layer made in bf16, the arguments of its CUDA GEMMs,
    its float32 absmax per block and its dequantized weight."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                            compress_statistics=True).to(torch.bfloat16).cuda()
    w, qs = lin.weight, lin.weight.quant_state
    args = (w.data.view(-1, 1), qs.shape, qs.state2.absmax, qs.blocksize, qs.quant_type)
    kw = dict(absmax_8bit=qs.absmax, absmax_code=qs.state2.code, absmax_offset=qs.offset)
    absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return lin, w, qs, args, kw, absmax, bnbf.dequantize_4bit(w.data, qs).to(torch.bfloat16)


def main():
    import bitsandbytes.functional as bnbf
    from bitsandbytes.backends.cuda import ops as cuda_ops
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        lin, w, qs, args, kw, absmax, dense = bf16_layer(n, k)
        for m in (16, 96):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            ref_y, ref_gx = x @ dense.t(), g @ dense
            fused = lambda: cuda_ops._gemm_4bit_kernel_impl(x, *args, None, **kw)  # noqa: E731
            copy = lambda: cuda_ops._dequant_linear_fallback(x, *args, None, **kw)  # noqa: E731
            whole_grad = lambda: g @ bnbf.dequantize_4bit(w.data, qs).to(torch.bfloat16)  # noqa: E731

            packed = w.data.view(-1)

            def part(a, b):   # rows [a, b) of W in bf16
                return torch.ops.bitsandbytes.dequantize_4bit(
                    packed[a * k // 2: b * k // 2], absmax[a * k // 64: b * k // 64], 64, "nf4", [b - a, k],
                    torch.bfloat16)

            def sliced_grad(mib, acc_dtype=torch.bfloat16):   # float32: cuBLAS's 16-bit in, float32 out
                rows = max(1, (mib << 20) // (k * 2))

                def run():
                    out = torch.zeros(m, k, device="cuda", dtype=acc_dtype)
                    for a in range(0, n, rows):
                        b = min(n, a + rows)
                        if acc_dtype == torch.bfloat16:
                            out.addmm_(g[:, a:b], part(a, b))
                        else:
                            out = torch.addmm(out, g[:, a:b], part(a, b), out_dtype=acc_dtype)
                    return out.to(torch.bfloat16)
                return run

            def sliced_fwd(mib, transposed):
                rows = max(1, (mib << 20) // (k * 2))

                def run():
                    if transposed:   # y^T row slices: each GEMM writes a contiguous block
                        yt = torch.empty(n, m, device="cuda", dtype=torch.bfloat16)
                        for a in range(0, n, rows):
                            torch.mm(part(a, min(n, a + rows)), x.t(), out=yt[a:min(n, a + rows)])
                        return yt.t().contiguous()
                    return torch.cat([x @ part(a, min(n, a + rows)).t() for a in range(0, n, rows)], -1)
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
                run = sliced_grad(32, torch.float32)
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


def layers(count: int = 8):
    """ms per layer (four matrices), forward at 16 and 96 rows and the input's gradient at 96."""
    import sys

    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    import checkout  # noqa: F401 - shomin from this checkout
    from shomin.tasks.models.levers.int4_weights import Weight4bit
    torch.manual_seed(0)
    mats = []
    for _ in range(count):
        for n, k in SHAPES.values():
            lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                    compress_statistics=True).to(torch.bfloat16).cuda()
            mats.append((lin.weight, Weight4bit(lin.weight), n, k))
    for m in (16, 96):
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _, _, n, k in mats[:4]]
        gs = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _, _, n, k in mats[:4]]

        def bnb_fwd():
            for i, (w, _, _, _) in enumerate(mats):
                bnb.matmul_4bit(xs[i % 4], w.t(), quant_state=w.quant_state)

        def bnb_grad():
            for i, (w, _, _, _) in enumerate(mats):
                gs[i % 4] @ bnbf.dequantize_4bit(w.data, w.quant_state).to(torch.bfloat16)

        def own_fwd():
            for i, (_, w4, _, _) in enumerate(mats):
                w4.forward(xs[i % 4], None)

        def own_grad():
            for i, (_, w4, _, _) in enumerate(mats):
                w4.grad_input(gs[i % 4])
        def eager(fn) -> float:   # op by op, host included: a graph's warm-up and capture run this way
            fn()
            torch.cuda.synchronize()
            t = __import__("time").perf_counter()
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            return round((__import__("time").perf_counter() - t) / 3 / count * 1e3, 3)
        with torch.no_grad():
            if m > 16:
                print(json.dumps({"layers": count, "rows": m, "op_by_op": True, "bnb_fwd_ms_per_layer": eager(bnb_fwd),
                                  "sliced_fwd_ms_per_layer": eager(own_fwd), "bnb_grad_ms_per_layer": eager(bnb_grad),
                                  "sliced_grad_ms_per_layer": eager(own_grad)}), flush=True)
            line = {"layers": count, "rows": m, "bnb_fwd_ms_per_layer": round(timed(bnb_fwd, 10) / count, 3),
                    "sliced_fwd_ms_per_layer": round(timed(own_fwd, 10) / count, 3)}
            if m > 16:
                line["bnb_grad_ms_per_layer"] = round(timed(bnb_grad, 10) / count, 3)
                line["sliced_grad_ms_per_layer"] = round(timed(own_grad, 10) / count, 3)
        print(json.dumps(line), flush=True)


def autograd_step(count: int = 8, rows: int = 96):
    """As the PPO update runs them: every matrix of COUNT layers forward and backward through
    autograd, recorded and replayed by shomin's ReplayedStep, bitsandbytes' layer against sliced."""
    import copy
    import sys

    import bitsandbytes as bnb
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    import checkout  # noqa: F401 - shomin from this checkout
    from shomin.tasks.models.levers import int4_weights
    from shomin.tasks.models.levers.cuda_graphs import ReplayedStep
    torch.manual_seed(0)
    own = torch.nn.ModuleList(
        bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
        for _ in range(count) for n, k in SHAPES.values()).to(torch.bfloat16).cuda()
    own.requires_grad_(False)   # frozen, as under a LoRA
    sliced, tiled = copy.deepcopy(own), copy.deepcopy(own)
    int4_weights.use_sliced(sliced)
    int4_weights.use_sliced(tiled, tiled=True)
    xs = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, requires_grad=True) for n, k in SHAPES.values()]
    for name, layers in (("bitsandbytes", own), ("sliced", sliced), ("triton", tiled)):
        def step():
            loss = sum(layer(xs[i % 4]).float().square().mean() for i, layer in enumerate(layers))
            loss.backward()
            return (loss.detach(),)
        run = ReplayedStep(step, xs)
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            run()
        end.record()
        torch.cuda.synchronize()
        print(json.dumps({"autograd_replayed": name, "layers": count, "rows": rows,
                          "ms_per_layer_fwd_bwd": round(start.elapsed_time(end) / 10 / count, 3)}), flush=True)
        run.close()


def kernel_sweep():
    import itertools
    import sys

    import bitsandbytes.functional as bnbf
    from bitsandbytes.backends.cuda import ops as cuda_ops
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    import checkout  # noqa: F401 - shomin from this checkout
    from shomin.tasks.models.levers import int4_kernel, int4_lookup
    torch.manual_seed(0)
    rel = lambda a, b: round(((a.float() - b.float()).norm() / b.float().norm()).item(), 5)  # noqa: E731
    for name, (n, k) in SHAPES.items():
        lin, w, qs, args, kw, absmax, dense = bf16_layer(n, k)
        packed, lookup = w.data.view(-1), int4_lookup.ptx(tuple(qs.code.tolist()))
        for m in (16, 96, 256, 384):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            line = {"layer": name, "shape": [n, k], "rows": m,
                    "bnb_fwd_copy_ms": timed(lambda: cuda_ops._dequant_linear_fallback(x, *args, None, **kw)),
                    "bnb_grad_copy_ms": timed(lambda: g @ bnbf.dequantize_4bit(w.data, qs).to(torch.bfloat16)),
                    "bnb_fwd_fused_ms": timed(lambda: cuda_ops._gemm_4bit_kernel_impl(x, *args, None, **kw))}
            for transposed, a, ref in ((False, x, x @ dense.t()), (True, g, g @ dense)):
                tag = "grad" if transposed else "fwd"
                run = lambda cfg=None: int4_kernel.matmul(a, packed, absmax, qs.code, (n, k), 64, None,  # noqa: E731
                                                          transposed, cfg, lookup=lookup)
                line[f"triton_{tag}_err"] = rel(run(), ref)
                line[f"triton_{tag}_ms"] = timed(run)
                line[f"triton_{tag}_with_absmax_ms"] = timed(
                    lambda: int4_kernel.matmul(a, packed, bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset,
                                               qs.code, (n, k), 64, None, transposed, lookup=lookup))
                if "sweep" not in sys.argv:
                    continue
                best = (1e9, None)
                bms = [64, 128]
                # in bytes of W where the block runs along its rows: at most half an absmax block
                bns = [16, 32] if transposed else [64, 128, 256]
                bks = [32, 64, 128] if transposed else [16, 32]
                for bm, bn, bk, warps, stages in itertools.product(bms, bns, bks, (4, 8), (2, 3, 4)):
                    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
                    try:
                        ms = timed(lambda: run(cfg), 20)
                    except Exception as e:  # noqa: BLE001 - a shape Triton can't place (shared memory)
                        print(json.dumps({"config": cfg, "error": str(e).splitlines()[0][:100]}), flush=True)
                        continue
                    best = min(best, (ms, json.dumps(cfg)), key=lambda t: t[0])
                line[f"triton_{tag}_best_ms"], line[f"triton_{tag}_best_cfg"] = best[0], best[1]
            print(json.dumps(line), flush=True)
        del lin, dense


if __name__ == "__main__":
    import sys
    {"layers": layers, "autograd": autograd_step, "kernel": kernel_sweep}.get(sys.argv[1] if sys.argv[1:] else "", main)()
