"""Is a PPO rollout bound by the host, and does replaying each decode step as a CUDA graph
(tasks/models/levers/static_decode.py) take that away?

A GPT-NeoX of the 20B width with few layers (per-layer cost = the difference between two
depths), LoRA r16 on query_key_value with a non-zero B, 16 left-padded prompts of 2-8
tokens, 16 new tokens, as bench/gpu_ppo.py's rollouts. Three ways: generate() (the stage
before this lever), the static-cache loop op by op, and the same loop replayed.
Usage: python bench/gpu_decode_graph.py QUANT [LAYERS]    (QUANT: 4bit, 8bit)
Prints one JSON line per (mode, depth): ms per rollout and per token, peak GiB above the
weights, and two checks:
  same_tokens_as_op_by_op  the replayed loop draws the op-by-op loop's tokens, same seed
  logit_err                max |logit - teacher-forced logit| over the sampled tokens' steps
                           (a full forward of prompt + response without a cache): the
                           cache, positions and masks are right when it is at the level
                           generate()'s own error shows (float16 noise)
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
from shomin.tasks.models.levers import static_decode  # noqa: E402
from shomin.tasks.models.loading import load_causal_lm, lora_config  # noqa: E402

QUANT = sys.argv[1]
LAYERS = int(sys.argv[2]) if len(sys.argv) > 2 else 6
PATH = Path(os.environ.get("BENCH_DIR", "/tmp/bench")) / f"neox20b_width_{LAYERS}"
BATCH, NEW, PAD, EOS = 16, 16, 0, 2


class Recorder:
    """Keeps the float32 logits each step samples from (a logits processor, and a warpers stand-in)."""
    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.clone())
        return scores


def prompts():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 9, (BATCH,), generator=g)
    ids = torch.full((BATCH, int(lengths.max())), PAD, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, n in enumerate(lengths.tolist()):
        ids[i, -n:] = torch.randint(3, 50000, (n,), generator=g)
        attn[i, -n:] = 1
    return ids.cuda(), attn.cuda()


def rollout(lm, ids, attn, mode: str, recorder=None):
    if mode == "generate":
        out = lm.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=NEW,
                          min_new_tokens=0, pad_token_id=PAD, eos_token_id=EOS,
                          logits_processor=[recorder] if recorder else None)
        return out[:, ids.shape[1]:]
    return static_decode.sample(lm, ids, attn, NEW, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=PAD,
                                eos_ids=torch.tensor([EOS], device="cuda"), graphed=mode == "graph")


def logit_err(lm, ids, attn, response, steps) -> float:
    """Largest gap between the logits a rollout sampled from and a cache-free forward's."""
    full_ids = torch.cat([ids, response], 1)
    full_attn = torch.cat([attn, torch.ones_like(response)], 1)
    position = (full_attn.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = lm(input_ids=full_ids, attention_mask=full_attn, position_ids=position, use_cache=False,
                    logits_to_keep=response.shape[1] + 1).logits[:, :-1].float()
    return max((logits[:, t] - s).abs().max().item() for t, s in enumerate(steps))


def main():
    from peft import get_peft_model
    path = few_layers_checkpoint("neox20b", LAYERS, PATH)
    lm = load_causal_lm(path, ModelSpec(source=str(path), dtype="float16"), "cuda", quantization=QUANT)
    lm = get_peft_model(lm, lora_config(LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=["query_key_value"])))
    lm.eval()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    weights = torch.cuda.memory_allocated() / 2**30
    ids, attn = prompts()
    layers = lm.base_model.model.gpt_neox.layers
    all_layers = list(layers)
    for depth in (LAYERS, 2):
        layers._modules = {str(i): m for i, m in enumerate(all_layers[:depth])}
        drawn = {}
        for mode in ("generate", "static", "graph"):
            try:
                rollout(lm, ids, attn, mode)   # warm: kernels chosen, Triton tuned
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                for _ in range(3):
                    rollout(lm, ids, attn, mode)
                torch.cuda.synchronize()
                ms = (time.perf_counter() - t) / 3 * 1000
                peak = torch.cuda.max_memory_allocated() / 2**30 - weights
                recorder = Recorder()
                torch.manual_seed(1)
                if mode == "generate":
                    response = rollout(lm, ids, attn, mode, recorder)
                else:
                    original = static_decode.warpers
                    static_decode.warpers = lambda *a: recorder
                    try:
                        response = rollout(lm, ids, attn, mode)
                    finally:
                        static_decode.warpers = original
                drawn[mode] = response
                row = {"quant": QUANT, "mode": mode, "layers": depth, "ms": round(ms, 1),
                       "ms_per_token": round(ms / NEW, 2), "over_weights_gib": round(peak, 3),
                       "new_tokens": response.shape[1],
                       "logit_err": round(logit_err(lm, ids, attn, response, recorder.steps), 4)}
                if mode == "graph":
                    row["same_tokens_as_op_by_op"] = bool(torch.equal(response, drawn["static"]))
                print(json.dumps(row), flush=True)
            except Exception as e:  # noqa: BLE001 - a measurement: say what broke
                print(json.dumps({"quant": QUANT, "mode": mode, "layers": depth,
                                  "error": f"{type(e).__name__}: {str(e)[:600]}"}), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
