"""SFT on rows of real lengths, stock stack vs shomin's SFT stage, tokens/s of real tokens.

The four-shape table trains rows that all have the same length, where padding costs
nothing. Real instruction data does not: here every row has the length, in tokens of the
embedded SmolLM2 tokenizer, of one of the rows the project ships (data/*.jsonl: dolly-ja,
reviews, chat, preference pairs; bench/lengths_shipped.json), drawn in a fixed order.
The stock stack (TRL SFTTrainer + PEFT + bitsandbytes with the stock script's settings)
pads each micro-batch to its longest row; shomin's stage with its defaults lays the rows
end to end (padding_free). Both count only real tokens.

  python bench/gpu_reallen.py lengths                      (CPU: rewrites bench/lengths_shipped.json)
  STOCK=../shared/bench/stock_qlora_sft.py python bench/gpu_reallen.py ARCH BATCH STEPS
Runs stock, then shomin (bench/gpu_sft.py ARCH 2048 BATCH STEPS default with BENCH_LENGTHS),
each in its own process, on the checkpoint the stock script writes; prints both JSON lines
and the ratio, appends them to $OUT/reallen.jsonl.
"""
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LENGTHS = HERE / "lengths_shipped.json"
MAX_SEQ = 2048


def shipped_texts(data: Path) -> list[str]:
    """One text per shipped row, as the stage would train on it (prompt and answer together)."""
    texts = []
    for f in sorted(data.glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if "messages" in r:
                texts.append("\n".join(m["content"] for m in r["messages"]))
            elif "instruction" in r:
                texts.append("\n".join(r[k] for k in ("instruction", "input", "output") if r.get(k)))
            elif "chosen" in r:
                texts.append(r["prompt"] + r["chosen"])
            else:
                texts.append(r["text"])
    return texts


def write_lengths() -> None:
    sys.path.insert(0, str(HERE))
    import checkout  # noqa: F401 - shomin from this checkout
    from shomin.tasks.ground.hub import embedded_gguf
    from transformers import AutoTokenizer
    folder, name = embedded_gguf("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    lengths = [len(tok(t)["input_ids"]) + 1 for t in shipped_texts(HERE.parent / "data")]   # + end of sequence
    LENGTHS.write_text(json.dumps({"tokenizer": "embedded SmolLM2-135M-Instruct", "rows": len(lengths),
                                   "lengths": lengths}) + "\n")
    print(f"{len(lengths)} rows, mean {sum(lengths) / len(lengths):.0f} tokens, max {max(lengths)}")


def rows_of_real_length(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n rows of random token ids whose lengths are the shipped rows', shuffled and repeated."""
    lengths = json.loads(LENGTHS.read_text())["lengths"]
    rng = random.Random(seed)
    order = []
    while len(order) < n:
        order += rng.sample(lengths, len(lengths))
    return [[rng.randrange(3, vocab) for _ in range(min(k, MAX_SEQ))] for k in order[:n]]


def stock(arch: str, batch: int, steps: int) -> None:
    """The stock script's stack and settings (its `load` and SFTConfig), these rows instead of its fixed-length ones."""
    sys.argv = [os.environ["STOCK"], arch, "qlora", str(MAX_SEQ), str(batch), str(steps)]
    sys.path.insert(0, str(Path(os.environ["STOCK"]).resolve().parent))
    import stock_qlora_sft as s
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer
    path = os.path.join(s.SCRATCH, f"rand_{arch}")
    s.make_checkpoint(path)
    model = s.load(path)
    rows = rows_of_real_length(batch * (steps + 2), model.config.vocab_size)
    cfg = SFTConfig(output_dir=os.path.join(s.SCRATCH, "sft_out"), per_device_train_batch_size=batch, max_steps=steps,
                    learning_rate=2e-4, bf16=True, logging_steps=10, gradient_checkpointing=True, max_length=MAX_SEQ,
                    report_to="none", save_strategy="no", packing=False, dataloader_num_workers=0)
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    clock = s.Clock()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_dict({"input_ids": rows}),
                         peft_config=lora, callbacks=[clock], processing_class=s.toy_tokenizer(model.config.vocab_size))
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    print(json.dumps(result("stock", arch, batch, clock.t, rows, torch.cuda.max_memory_allocated())), flush=True)


def result(name: str, arch: str, batch: int, times: list[float], rows: list[list[int]], peak: int) -> dict:
    import torch
    warm = 3
    real_per_row = sum(map(len, rows)) / len(rows)
    dt, steps = times[-1] - times[warm - 1], len(times) - warm
    return {"impl": name, "arch": arch, "batch": batch, "steps_timed": steps, "mean_row_tokens": round(real_per_row, 1),
            "real_tokens_per_s": round(steps * batch * real_per_row / dt), "s_per_step": round(dt / steps, 3),
            "peak_alloc_gib": round(peak / 2**30, 2), "gpu": torch.cuda.get_device_name(0)}


def main() -> None:
    if sys.argv[1] == "lengths":
        return write_lengths()
    if sys.argv[1] == "stock":
        return stock(*sys.argv[2:3], *map(int, sys.argv[3:5]))
    arch, batch, steps = sys.argv[1], sys.argv[2], sys.argv[3]
    out = Path(os.environ.get("OUT", ".")) / "reallen.jsonl"
    lines = []
    for cmd, env in (([sys.executable, __file__, "stock", arch, batch, steps], {}),
                     ([sys.executable, str(HERE / "gpu_sft.py"), arch, str(MAX_SEQ), batch, steps, "default"],
                      {"BENCH_LENGTHS": str(LENGTHS)})):
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
        found = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"impl"')]
        if proc.returncode or not found:
            print((proc.stdout + proc.stderr)[-4000:], flush=True)
            raise SystemExit(f"failed: {' '.join(cmd)}")
        lines.append({**found[-1], "wall_s": round(time.time() - t0, 1)})
        print(json.dumps(lines[-1]), flush=True)
    lines[1]["speed_ratio"] = round(lines[1]["real_tokens_per_s"] / lines[0]["real_tokens_per_s"], 3)
    lines[1]["memory_ratio"] = round(lines[1]["peak_alloc_gib"] / lines[0]["peak_alloc_gib"], 3)
    print(f"real tokens/s: stock {lines[0]['real_tokens_per_s']}, shomin {lines[1]['real_tokens_per_s']} "
          f"({lines[1]['speed_ratio']}x), peak {lines[0]['peak_alloc_gib']} vs {lines[1]['peak_alloc_gib']} GiB", flush=True)
    with out.open("a") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
