"""shomin's own SFT stage on the same random checkpoint, data and LoRA settings as
../shared/bench/stock_qlora_sft.py, so the two can be compared in one device run.

Usage: python bench/gpu_sft.py ARCH SEQ BATCH STEPS VARIANT
  ARCH: a checkpoint the stock script wrote to $BENCH_DIR/rand_ARCH
  VARIANT: comma-separated levers on top of the stock recipe (QLoRA nf4 + double
           quant, LoRA r16 a16 all-linear, gradient checkpointing):
             same      nothing changed (must match stock)
             liger     fused Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy)
             nockpt    no gradient checkpointing
             paged8    paged 8-bit AdamW
Prints one JSON line like the stock script, plus the mean loss of each 10-step window.
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.config import LoraSettings, ModelSpec, SftSettings  # noqa: E402
from tasks.data import DataResult  # noqa: E402
from tasks.model import ModelResult  # noqa: E402
from tasks.sft import build_trainer  # noqa: E402

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


def main():
    from transformers import AutoConfig, TrainerCallback
    path = SCRATCH / f"rand_{ARCH}"
    vocab = AutoConfig.from_pretrained(path).vocab_size
    work = Path(tempfile.mkdtemp(prefix="shomin-bench-"))
    g = torch.Generator().manual_seed(0)   # the stock script's data, row for row
    rows = [torch.randint(3, vocab, (SEQ,), generator=g).tolist() for _ in range(BATCH * (STEPS + 2))]
    with open(work / "train.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"input_ids": r}) + "\n")
    data = DataResult(stage="dataset", output_dir=str(work), train_path=str(work / "train.jsonl"),
                      eval_path=str(work / "train.jsonl"), format="text", n_train=len(rows), n_eval=0)
    model_res = ModelResult(stage="model_init", output_dir=str(work), model_path=str(path),
                            tokenizer_path=toy_tokenizer(vocab, work / "tok"), num_parameters=0, architecture="")
    spec = ModelSpec(source=str(path), quantization="4bit", dtype="bfloat16", compute_dtype="bfloat16")
    settings = SftSettings(
        lora=LoraSettings(r=16, alpha=16, dropout=0.05, target_modules="all-linear"), learning_rate=2e-4,
        max_steps=STEPS, batch_size=BATCH, micro_batch_size=BATCH, max_seq_length=SEQ, logging_steps=10,
        save_steps=10**6, gradient_checkpointing="nockpt" not in levers,
        kernels="liger" if "liger" in levers else "none",
        optim="paged_adamw_8bit" if "paged8" in levers else "adamw_torch")

    class Clock(TrainerCallback):
        t: list = []

        def on_step_end(self, args, state, control, **kw):
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            Clock.t.append(time.perf_counter())

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    trainer = build_trainer(settings, spec, model_res, data, DEVICE, work / "ckpt", seed=42)
    load_s = time.time() - t0
    trainer.add_callback(Clock())
    trainer.train()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under `accelerate launch` every process trains BATCH rows
    if int(os.environ.get("RANK", "0")) != 0:
        return
    warm = 3
    dt = Clock.t[-1] - Clock.t[warm - 1]
    steps = len(Clock.t) - warm
    losses = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
    print(json.dumps({
        "arch": ARCH, "variant": VARIANT, "seq": SEQ, "batch": BATCH, "steps_timed": steps,
        "gpus": world, "tokens_per_s": round(world * steps * BATCH * SEQ / dt), "s_per_step": round(dt / steps, 3),
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if DEVICE == "cuda" else None,
        "load_s": round(load_s, 1), "loss_windows": losses, "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
    }), flush=True)


if __name__ == "__main__":
    main()
