"""Where a PPO mini-batch's time goes on the 20B shape: one forward + backward of the LoRA
policy (mini-batch 4 x 24 tokens), eager and under torch.compile, with the GPU's busy time.

Usage: python bench/gpu_ppo_profile.py QUANT [compile]     (after bench/gpu_ppo.py wrote the checkpoint)
  BENCH_INT8=llm_int8: bitsandbytes' own 8-bit matmul instead of shomin's weight-only one
Prints one JSON line per mode: ms per forward+backward (wall), ms of CUDA kernel time in it,
and the top kernels. Wall far above kernel time means the step is bound by the host
(Python and launches), which CUDA graphs remove; kernel time near wall means the GPU is.
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
from shomin.tasks.ground.settings import LoraSettings, ModelSpec  # noqa: E402
from shomin.tasks.models.loading import checkpointed_in_eval, load_causal_lm, lora_config  # noqa: E402

QUANT = sys.argv[1]
INT8 = os.environ.get("BENCH_INT8", "weight_only")
PATH = Path(os.environ.get("BENCH_DIR", "/tmp/bench")) / "ppo_neox20b"


def step(lm, ids, attn):
    out = lm(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=17)
    out.logits.float().logsumexp(-1).mean().backward()


def timed(lm, ids, attn, n=5) -> float:
    step(lm, ids, attn)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step(lm, ids, attn)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1000


def main():
    from peft import get_peft_model
    lm = load_causal_lm(PATH, ModelSpec(source=str(PATH), dtype="float16", int8_matmul=INT8), "cuda", quantization=QUANT)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm = get_peft_model(lm, lora_config(LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=["query_key_value"])))
    lm.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50000, (4, 24), generator=g).cuda()
    attn = torch.ones_like(ids)
    for checkpointing in (False, True):
        with checkpointed_in_eval(lm, checkpointing):
            wall = timed(lm, ids, attn)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step(lm, ids, attn)
                torch.cuda.synchronize()
        events = prof.key_averages()
        kernel_ms = sum(e.self_device_time_total for e in events) / 1000
        top = sorted(events, key=lambda e: -e.self_device_time_total)[:6]
        print(json.dumps({"quant": QUANT, "int8_matmul": INT8, "mode": "eager", "checkpointing": checkpointing, "ms_fwd_bwd": round(wall, 1),
                          "kernel_ms": round(kernel_ms, 1), "n_kernels": sum(e.count for e in events),
                          "top": [(e.key[:60], round(e.self_device_time_total / 1000, 1)) for e in top]}), flush=True)
    if "compile" in sys.argv[2:]:
        try:
            t = time.time()
            compiled = torch.compile(lm)
            wall = timed(compiled, ids, attn, n=5)
            print(json.dumps({"quant": QUANT, "mode": "compile", "ms_fwd_bwd": round(wall, 1),
                              "compile_s": round(time.time() - t, 1)}), flush=True)
        except Exception as e:  # noqa: BLE001 - a measurement: say what broke
            print(json.dumps({"quant": QUANT, "mode": "compile", "error": f"{type(e).__name__}: {str(e)[:300]}"}))


if __name__ == "__main__":
    main()
