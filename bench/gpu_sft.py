"""shomin's own SFT stage on the same random checkpoint, data and LoRA settings as
../shared/bench/stock_qlora_sft.py, so the two can be compared in one device run.

Usage: python bench/gpu_sft.py ARCH SEQ BATCH STEPS VARIANT
  ARCH: a checkpoint the stock script wrote to $BENCH_DIR/rand_ARCH
  VARIANT: `default` (the SFT stage's own defaults: every lever below that is on by
           default) or comma-separated levers on top of the stock recipe (QLoRA nf4 +
           double quant, LoRA r16 a16 dropout 0.05 all-linear, gradient checkpointing):
             same      nothing changed (must match stock)
             liger     fused Triton kernels (RMSNorm, SwiGLU, RoPE)
             keep16    frozen norms/embeddings/LM head stay bf16 (no float32 residual stream)
             fused     one autograd function per LoRA linear (tasks/models/levers/fast_lora.py)
             offload   checkpointed layer inputs (and, with fused, attention outputs) in pinned host
                       memory (tasks/models/levers/checkpointing.py)
             nockpt    no gradient checkpointing
             paged8    paged 8-bit AdamW
             nooutputs attention outputs recomputed, not fetched from host (e.g. default,nooutputs)
             chunkN    mlp_chunk_tokens N (e.g. default,chunk2048); padded: padding_free off
Prints one JSON line like the stock script, plus the mean loss of each 10-step window.
BENCH_LENGTHS=file trains rows of the real lengths bench/gpu_reallen.py draws (SEQ is then the cut-off).
BENCH_CAP_GIB=c caps the process at c GiB of GPU memory (bench/maxctx.py). BENCH_LAYERS=n runs an n-layer copy of the shape (quick profiling); BENCH_PROFILE=1 prints
torch.profiler's top CUDA kernels over two steps after warm-up (=shapes: also the copy-like
ops by input shape).
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkout  # noqa: E402,F401 - shomin from this checkout
from shomin.tasks.ground.records import (
    DataResult,  # noqa: E402
    ModelResult,  # noqa: E402
)
from shomin.tasks.ground.settings import LoraSettings, ModelSpec  # noqa: E402
from shomin.tasks.stages.sft import (
    SftSettings,  # noqa: E402
    build_trainer,  # noqa: E402
)

ARCH, SEQ, BATCH, STEPS, VARIANT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
SCRATCH = Path(os.environ.get("BENCH_DIR", tempfile.gettempdir()))
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")  # cpu: a dry run of the script on a tiny checkpoint
levers = set(VARIANT.split(","))


def toy_tokenizer(vocab: int, folder: Path) -> str:
    """Word-level over the whole id range, as the stock script does: data is pre-tokenized."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<pad>")),
                                  pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(folder)
    return str(folder)


def short_checkpoint(layers: int) -> Path:
    """The shape of ARCH with fewer layers: every per-layer cost is the same, at a fraction of the load time."""
    from shapes import SHAPES
    from transformers import AutoConfig, AutoModelForCausalLM
    path = SCRATCH / f"rand_{ARCH}_L{layers}"
    if not (path / "config.json").exists():
        model_type, kw = SHAPES[ARCH]
        with torch.device(DEVICE):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**kw, "num_hidden_layers": layers}),
                                                     dtype=torch.bfloat16)
        model.save_pretrained(path)
    return path


def profile_callback():
    """torch.profiler over steps 5 and 6, top kernels by CUDA time to stdout and $OUT."""
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 4:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA],
                                                   record_shapes=os.environ.get("BENCH_PROFILE") == "shapes")
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 6 and self.prof:
                torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                table = self.prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
                if os.environ.get("BENCH_PROFILE") == "shapes":
                    table += "\n" + copy_shapes(self.prof)
                print(table, flush=True)
                (Path(os.environ.get("OUT", ".")) / f"profile_{ARCH}_{VARIANT}.txt").write_text(table)
                self.prof = None
    return Profile()


def copy_shapes(prof) -> str:
    """The copy-like ops by input shape (and so by call site): where non-GEMM time goes."""
    rows = [e for e in prof.key_averages(group_by_input_shape=True)
            if e.key in ("aten::copy_", "aten::cat", "aten::contiguous", "aten::clone", "aten::addmm", "aten::stack")]
    rows.sort(key=lambda e: -e.self_device_time_total)
    return "\n".join(f"{e.self_device_time_total / 1000:8.2f} ms {e.count:5d}x {e.key} {e.input_shapes}"[:300]
                     for e in rows[:30])


def main():
    from transformers import AutoConfig, TrainerCallback
    path = SCRATCH / f"rand_{ARCH}"
    if os.environ.get("BENCH_LAYERS"):
        path = short_checkpoint(int(os.environ["BENCH_LAYERS"]))
    vocab = AutoConfig.from_pretrained(path).vocab_size
    work = Path(tempfile.mkdtemp(prefix="shomin-bench-"))
    g = torch.Generator().manual_seed(0)   # the stock script's data, row for row
    rows = [torch.randint(3, vocab, (SEQ,), generator=g).tolist() for _ in range(BATCH * (STEPS + 2))]
    if os.environ.get("BENCH_LENGTHS"):   # rows of real lengths (bench/gpu_reallen.py), the same ones stock trains
        from gpu_reallen import rows_of_real_length
        rows = rows_of_real_length(BATCH * (STEPS + 2), vocab)
    with open(work / "train.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"input_ids": r}) + "\n")
    data = DataResult(stage="dataset", output_dir=str(work), train_path=str(work / "train.jsonl"),
                      eval_path=str(work / "train.jsonl"), format="text", n_train=len(rows), n_eval=0)
    model_res = ModelResult(stage="model_init", output_dir=str(work), model_path=str(path),
                            tokenizer_path=toy_tokenizer(vocab, work / "tok"), num_parameters=0, architecture="")
    spec = ModelSpec(source=str(path), quantization="4bit", dtype="bfloat16", compute_dtype="bfloat16")
    levers_off = {} if "default" in levers else dict(
        kernels="liger" if "liger" in levers else "none", fused_lora="fused" in levers,
        frozen_dtype="compute" if "keep16" in levers else "float32", offload_checkpoints="offload" in levers,
        padding_free=False, mlp_chunk_tokens=0)
    if "nooutputs" in levers:
        levers_off["offload_outputs"] = False
    for lever in levers:   # chunkN: mlp_chunk_tokens N on top of the rest (default,chunk2048)
        if lever.startswith("chunk"):
            levers_off["mlp_chunk_tokens"] = int(lever.removeprefix("chunk"))
    if "padded" in levers:
        levers_off["padding_free"] = False
    settings = SftSettings(
        lora=LoraSettings(r=16, alpha=16, dropout=0.05, target_modules="all-linear"), learning_rate=2e-4,
        max_steps=STEPS, batch_size=BATCH, micro_batch_size=BATCH, max_seq_length=SEQ, logging_steps=10,
        save_steps=10**6, gradient_checkpointing="nockpt" not in levers,
        optim="paged_adamw_8bit" if "paged8" in levers else "adamw_torch", **levers_off)

    class Clock(TrainerCallback):
        t: list = []

        def on_step_end(self, args, state, control, **kw):
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            Clock.t.append(time.perf_counter())

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        if os.environ.get("BENCH_CAP_GIB"):   # a smaller card: what bench/maxctx.py searches under
            cap = float(os.environ["BENCH_CAP_GIB"]) * 2**30
            torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    t0 = time.time()
    trainer, _levers = build_trainer(settings, spec, model_res, data, DEVICE, work / "ckpt", seed=42)
    load_s = time.time() - t0
    trainer.add_callback(Clock())
    if os.environ.get("BENCH_PROFILE"):
        trainer.add_callback(profile_callback())
    weights_gib = torch.cuda.memory_allocated() / 2**30 if DEVICE == "cuda" else None
    trainer.train()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under `accelerate launch` every process trains BATCH rows
    if int(os.environ.get("RANK", "0")) != 0:
        return
    warm = min(3, STEPS - 1)   # bench/maxctx.py runs 2 steps: the second is timed
    dt = Clock.t[-1] - Clock.t[warm - 1]
    steps = len(Clock.t) - warm
    losses = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
    if os.environ.get("BENCH_LENGTHS"):
        from gpu_reallen import result
        print(json.dumps(result("shomin", ARCH, BATCH, Clock.t, rows, torch.cuda.max_memory_allocated())), flush=True)
        return
    print(json.dumps({
        "arch": ARCH, "variant": VARIANT, "seq": SEQ, "batch": BATCH, "steps_timed": steps,
        "gpus": world, "tokens_per_s": round(world * steps * BATCH * SEQ / dt), "s_per_step": round(dt / steps, 3),
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if DEVICE == "cuda" else None,
        "weights_gib": round(weights_gib, 2) if weights_gib else None, "load_s": round(load_s, 1), "loss_windows": losses, "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
    }), flush=True)


if __name__ == "__main__":
    main()
