"""shomin's PPO stage on a random-weight model of a real shape, on one GPU: peak memory
and seconds per PPO step, split into generation (rollout) and the rest (scoring,
reference pass, PPO update). Seed 003 claims the 20B chain fits a 24 GB GPU.

Usage: python bench/gpu_ppo.py ARCH QUANT QUERIES NEW_TOKENS STEPS [checkpointing|selective]
  ARCH: neox20b | neox7b | llama7b      QUANT: 8bit | 4bit | none
  checkpointing: stages.ppo.gradient_checkpointing on;  selective: `selective` (each layer's norm + MLP and attention);
  llm_int8: model.int8_matmul llm_int8 (bitsandbytes' own 8-bit matmul, as the seed ran) instead of the default
  weight_only;  eager: stages.ppo.cuda_graphs off
  BENCH_LAYERS=N: N layers of ARCH's width instead of all
  BENCH_INT4=sliced|triton: 4-bit layers with no whole 16-bit weight copy (model.int4_matmul), instead of the default bitsandbytes
  under `accelerate launch`: data parallel, QUERIES per process (bench/gpu_ppo_multi.sh)
  BENCH_POOLS=1: where the reserved memory sits (the default pool or a CUDA graph's private one; reserved and
    allocated GiB of each) at three points of the first two steps (pools_by_phase): "pools" in the line
  BENCH_MEMORY_SNAPSHOT=FILE: record every allocation and dump the trace to FILE (bench/memory_at_peak.py reads it);
    with `checkpointing` the recorder broke the run on torch 2.11 (SystemError in Function.apply in the
    recompute), the same run without it completes
Also prints, for the first two steps, the running peak after each phase (rollout, reference
pass, update): which phase sets the stage's peak.
Prints one JSON line. Needs: torch, transformers, peft, accelerate, bitsandbytes (carry wheels).
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))
import checkout  # noqa: E402,F401 - shomin from this checkout
from shapes import SHAPES  # noqa: E402
from shomin.tasks import registry  # noqa: E402
from shomin.tasks.ground.contract import StageContext  # noqa: E402
from shomin.tasks.ground.records import (
    DataResult,  # noqa: E402
    MergeResult,  # noqa: E402
)
from shomin.tasks.ground.settings import (  # noqa: E402
    LoraSettings,
    ModelSpec,
    RewardSettings,  # noqa: E402
)
from shomin.tasks.stages.ppo import PpoSettings  # noqa: E402

ARCH, QUANT = sys.argv[1], sys.argv[2]
QUERIES, NEW_TOKENS, STEPS = map(int, sys.argv[3:6])
CHECKPOINTING = "selective" if "selective" in sys.argv[6:] else "checkpointing" in sys.argv[6:]
INT8 = "llm_int8" if "llm_int8" in sys.argv[6:] else "weight_only"
CUDA_GRAPHS = "eager" not in sys.argv[6:]
INT4 = os.environ.get("BENCH_INT4", "bitsandbytes")   # model.int4_matmul; the shipped default
LAYERS = os.environ.get("BENCH_LAYERS")   # fewer layers of the same width: a quick look, not the table
SCRATCH = Path(os.environ.get("BENCH_DIR", tempfile.gettempdir()))
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")  # cpu: a dry run of the script on the tiny shape


def reward(texts):
    """Cheap and learnable: share of tokens that are even-numbered words. The reward
    model's cost is not what this benchmark measures."""
    out = []
    for t in texts:
        words = t.split()
        out.append(sum(w[1:].isdigit() and int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1))
    return out


def tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def checkpoint() -> Path:
    """Random weights in fp16 (the dtype the merge stage writes), written once."""
    from transformers import AutoConfig, AutoModelForCausalLM
    path = SCRATCH / (f"ppo_{ARCH}" + (f"_{LAYERS}layers" if LAYERS else ""))
    if (path / "config.json").exists():
        return path
    model_type, kw = SHAPES[ARCH]
    kw = {**kw, "num_hidden_layers": int(LAYERS)} if LAYERS else kw
    config = AutoConfig.for_model(model_type, **kw)
    t = time.time()
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(path, max_shard_size="4GB")
    tokenizer(config.vocab_size).save_pretrained(path)
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    print(f"checkpoint {ARCH} written in {time.time() - t:.0f}s", flush=True)
    return path


def watch_phases() -> list:
    """The running GPU peak (GiB) after each phase of the stage's first two steps, read off
    without resetting the counter the stage's own peak comes from."""
    from shomin.tasks.stages import ppo
    seen = []

    def after(name, fn):
        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            if len(seen) < 6:
                torch.cuda.synchronize()
                seen.append([name, round(torch.cuda.max_memory_allocated() / 2**30, 3)])
            return out
        return wrapped
    for name in ("rollout", "advantages", "update"):
        setattr(ppo, name, after(name, getattr(ppo, name)))
    return seen


def pools_by_phase() -> list:
    """[phase, {"pool P stream S": [reserved GiB, allocated GiB]}, reserved GiB, peak reserved GiB so far]
    once the model is loaded, then in the first two steps: just before the rollout's decode graph is let
    go, after the rollout, just before the update's graph is let go. Pool (0, 0) is the default one."""
    from shomin.tasks.models.levers.cuda_graphs import ReplayedStep
    from shomin.tasks.stages import ppo
    seen = []

    def look(phase):
        if len(seen) >= 7:
            return
        torch.cuda.synchronize()
        pools = {}
        for seg in torch.cuda.memory_snapshot():
            pool = f"pool {tuple(seg.get('segment_pool_id', (0, 0)))} stream {seg.get('stream', 0)}"
            got = pools.setdefault(pool, [0.0, 0.0])
            got[0] += seg["total_size"] / 2**30
            got[1] += seg["allocated_size"] / 2**30
        seen.append([phase, {k: [round(a, 3), round(b, 3)] for k, (a, b) in pools.items()},
                     round(torch.cuda.memory_reserved() / 2**30, 3), round(torch.cuda.max_memory_reserved() / 2**30, 3)])
    rollout, close = ppo.rollout, ReplayedStep.close

    inside = []

    def after_rollout(*a, **kw):
        if not seen:
            look("model loaded, before the first rollout")
        inside.append(True)
        try:
            out = rollout(*a, **kw)
        finally:
            inside.clear()
        look("after rollout")
        return out

    def before_close(self):
        look("decode graph, before close" if inside else "update graph, before close")
        return close(self)
    ppo.rollout, ReplayedStep.close = after_rollout, before_close
    return seen


def main():
    rank = int(os.environ.get("LOCAL_RANK", 0))   # under `accelerate launch` (bench/gpu_ppo_multi.sh): one GPU each
    if DEVICE == "cuda":
        torch.cuda.set_device(rank)
    path = checkpoint()
    vocab = SHAPES[ARCH][1]["vocab_size"]
    work = Path(tempfile.mkdtemp(prefix="shomin-ppo-"))
    g = torch.Generator().manual_seed(0)
    with open(work / "train.jsonl", "w") as f:
        for _ in range(256):
            f.write(json.dumps({"text": " ".join(f"t{i}" for i in torch.randint(3, vocab, (12,), generator=g).tolist())}) + "\n")
    data = DataResult(stage="dataset", output_dir=str(work), train_path=str(work / "train.jsonl"),
                      eval_path=str(work / "train.jsonl"), format="text", n_train=256, n_eval=0)
    merge = MergeResult(stage="merge", output_dir=str(path), merged_path=str(path))
    spec = ModelSpec(source=str(path), dtype="float16", int8_matmul=INT8, int4_matmul=INT4)
    settings = PpoSettings(
        quantization=QUANT, steps=STEPS, gradient_checkpointing=CHECKPOINTING, cuda_graphs=CUDA_GRAPHS, batch_size=QUERIES, mini_batch_size=4,
        response_min_tokens=NEW_TOKENS, response_max_tokens=NEW_TOKENS, save_steps=10**6,
        lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=["query_key_value"] if "neox" in ARCH else "all-linear"),
        reward=RewardSettings(kind="function", function="gpu_ppo:reward"))
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    phases = watch_phases() if DEVICE == "cuda" else []
    pools = pools_by_phase() if DEVICE == "cuda" and os.environ.get("BENCH_POOLS") else None
    snapshot = os.environ.get("BENCH_MEMORY_SNAPSHOT")
    if snapshot:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    t0 = time.time()
    ctx = StageContext(stage="ppo", settings=settings, model=spec, seed=0, device=DEVICE, out_dir=str(work / "ppo"))
    result = registry.execute(registry.get("ppo"), ctx, {"merge": merge, "dataset": data})
    if snapshot:
        torch.cuda.memory._dump_snapshot(snapshot)
        torch.cuda.memory._record_memory_history(enabled=None)
    if rank:   # the main process writes the log and prints the line
        return
    log = json.loads((work / "ppo" / "ppo_log.json").read_text())
    timed = log[1:] or log  # the first step carries CUDA/cuBLAS warm-up
    mean = lambda k: sum(e[k] for e in timed) / len(timed)  # noqa: E731
    print(json.dumps({
        "arch": ARCH, "quant": QUANT, "queries": QUERIES, "gpus": int(os.environ.get("WORLD_SIZE", 1)),
        "new_tokens": NEW_TOKENS, "steps": len(log),
        "s_per_step": round(mean("step_seconds"), 2), "rollout_s": round(mean("rollout_seconds"), 2),
        "update_s": round(mean("update_seconds"), 2),
        "checkpointing": CHECKPOINTING, "int8_matmul": INT8 if QUANT == "8bit" else None,
        "int4_matmul": INT4 if QUANT == "4bit" else None,
        "cuda_graphs": CUDA_GRAPHS, "layers": LAYERS,
        "running_peak_gib": phases, **({"pools": pools} if pools is not None else {}),
        "weights_gib": round(result.metrics.get("weights_gpu_gib", 0.0), 2),
        "overhead_gib": round(torch.cuda.max_memory_allocated() / 2**30 - result.metrics.get("weights_gpu_gib", 0.0), 2) if DEVICE == "cuda" else None,
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if DEVICE == "cuda" else None,
        "stage_s": round(time.time() - t0, 1), "reward_first": round(log[0]["reward_mean"], 3),
        "reward_last": round(log[-1]["reward_mean"], 3), "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
        "resumed": result.resumed_from_step,
    }), flush=True)


if __name__ == "__main__":
    main()
