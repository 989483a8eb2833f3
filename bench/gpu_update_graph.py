"""Is a PPO update mini-batch bound by the host, and does capturing its forward + backward
as one CUDA graph take that away (with and without gradient checkpointing)?
(torch.compile of each decoder layer did not: 2026-11-24, 4-bit, the same wall time.)

A GPT-NeoX of the 20B width with few layers (per-layer cost = the difference between
two depths), LoRA r16 on query_key_value, mini-batch 4 x 24 tokens, logits_to_keep 17.
Usage: python bench/gpu_update_graph.py QUANT [LAYERS]    (QUANT: 4bit, 8bit)
Prints one JSON line per (mode, depth): ms per forward+backward (wall), CUDA kernel ms,
kernel count, peak GiB above the weights, and the largest LoRA-gradient difference to eager.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
import checkout  # noqa: E402,F401
from shapes import few_layers_checkpoint  # noqa: E402
from shomin.tasks.ground.settings import LoraSettings, ModelSpec  # noqa: E402
from shomin.tasks.models.levers.cuda_graphs import ReplayedStep  # noqa: E402
from shomin.tasks.models.loading import load_causal_lm, lora_config  # noqa: E402

QUANT = sys.argv[1]
LAYERS = int(sys.argv[2]) if len(sys.argv) > 2 else 6
PATH = Path(os.environ.get("BENCH_DIR", "/tmp/bench")) / f"neox20b_width_{LAYERS}"


def step(lm, ids, attn):
    out = lm(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=17)
    out.logits.float().logsumexp(-1).mean().backward()


def measure(lm, ids, attn, weights, n=5) -> dict:
    for p in lm.parameters():
        p.grad = None
    step(lm, ids, attn)
    grads = [p.grad.clone() for p in lm.parameters() if p.requires_grad]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(n):
        step(lm, ids, attn)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / n * 1000
    peak = torch.cuda.max_memory_allocated() / 2**30 - weights
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(lm, ids, attn)
        torch.cuda.synchronize()
    events = prof.key_averages()
    return {"ms": round(wall, 1), "kernel_ms": round(sum(e.self_device_time_total for e in events) / 1000, 1),
            "n_kernels": sum(e.count for e in events), "over_weights_gib": round(peak, 3)}, grads


def main():
    from peft import get_peft_model
    from shomin.tasks.models.loading import checkpointed_in_eval
    path = few_layers_checkpoint("neox20b", LAYERS, PATH)
    lm = load_causal_lm(path, ModelSpec(source=str(path), dtype="float16"), "cuda", quantization=QUANT)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False})
    lm = get_peft_model(lm, lora_config(LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=["query_key_value"])))
    lm.eval()
    for p in lm.parameters():
        if p.requires_grad:   # a non-zero B so gradients reach A and the layers below
            torch.nn.init.normal_(p, std=0.02)
    weights = torch.cuda.memory_allocated() / 2**30
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50000, (4, 24), generator=g).cuda()
    attn = torch.ones_like(ids)
    attn[0, :3] = 0
    layers = lm.base_model.model.gpt_neox.layers
    all_layers = list(layers)
    for depth in (LAYERS, 2):
        layers._modules = {str(i): m for i, m in enumerate(all_layers[:depth])}
        for ckpt in (False, True):
            with checkpointed_in_eval(lm, ckpt):
                row, eager = measure(lm, ids, attn, weights)
                print(json.dumps({"quant": QUANT, "mode": "eager", "ckpt": ckpt, "layers": depth, **row}), flush=True)
                try:
                    torch.cuda.reset_peak_memory_stats()
                    # the stage's own mechanism: first call op by op, second records and replays
                    params = [p for p in lm.parameters() if p.requires_grad]
                    replayed = ReplayedStep(lambda: (step(lm, ids, attn),), params)
                    replayed()
                    replayed()
                    torch.cuda.synchronize()
                    grads = [p.grad.clone() for p in params]
                    diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(grads, eager))
                    peak = torch.cuda.max_memory_allocated() / 2**30 - weights
                    t = time.perf_counter()
                    for _ in range(10):
                        replayed()
                    torch.cuda.synchronize()
                    ms = (time.perf_counter() - t) / 10 * 1000
                    print(json.dumps({"quant": QUANT, "mode": "graph", "ckpt": ckpt, "layers": depth, "ms": round(ms, 1),
                                      "over_weights_gib": round(peak, 3), "grad_rel_diff": round(diff, 5),
                                      "replayed": replayed.graph is not None}), flush=True)
                    replayed.close()
                except Exception as e:  # noqa: BLE001 - a measurement: say what broke
                    print(json.dumps({"quant": QUANT, "mode": "graph", "ckpt": ckpt, "layers": depth,
                                      "error": f"{type(e).__name__}: {str(e)[:600]}"}), flush=True)
                for p in lm.parameters():
                    p.grad = None
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
