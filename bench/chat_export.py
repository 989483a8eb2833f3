"""Chat and export on a finished chat-local run, timed on this CPU: one `shomin chat --prompt`
answer, `shomin export` to GGUF f16 and q8_0, and how close transformers' reading of each GGUF
comes to the merged model (max |logit difference| / std of the logits, and next-token argmax
agreement over the held-out conversations). Appends one JSON line to bench/results_chat.jsonl.

    .venv/bin/shomin run chat-local && .venv/bin/python bench/chat_export.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import checkout  # noqa: F401  (shomin importable from a checkout)
import torch
from shomin.tasks.ground.outputs import latest_completed, run_model
from shomin.tasks.models.chat import render
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
SHOMIN = [sys.executable, "-m", "shomin.flows.cli"]


def timed(*args) -> tuple[float, str]:
    t0 = time.time()
    r = subprocess.run([*SHOMIN, *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return time.time() - t0, r.stdout


@torch.no_grad()
def closeness(reference, other, batches) -> dict:
    worst, agree, total = 0.0, 0, 0
    for ids in batches:
        a, b = reference(ids).logits[0], other(ids).logits[0]
        worst = max(worst, float((a - b).abs().max() / a.std()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    return {"max_diff_over_std": round(worst, 4), "argmax_agreement": round(agree / total, 4), "positions": total}


def main() -> None:
    run = latest_completed(ROOT / "runs", "chat-local")
    found = run_model(run)
    chat_s, answer = timed("chat", str(run), "--prompt", "How do I get from Tokyo Station to Asakusa?",
                           "--max-new-tokens", "48")
    tok = AutoTokenizer.from_pretrained(found.tokenizer)
    rows = [json.loads(line) for line in open(run / "dataset" / "eval.jsonl", encoding="utf-8")]
    batches = [torch.tensor([tok(render(tok, r["messages"]), add_special_tokens=False)["input_ids"]]) for r in rows]
    merged = AutoModelForCausalLM.from_pretrained(found.weights, dtype=torch.float32).eval()
    out = {"run": str(run.relative_to(ROOT)), "chat_prompt_s": round(chat_s, 1), "answer": answer.strip()}
    for outtype in ("f16", "q8_0"):
        dest = run / "export" / f"gguf-{outtype}"
        seconds, _ = timed("export", str(run), "--format", "gguf", "--outtype", outtype, "--out", str(dest))
        (gguf_file,) = dest.glob("*.gguf")
        back = AutoModelForCausalLM.from_pretrained(dest, gguf_file=gguf_file.name, dtype=torch.float32).eval()
        out[outtype] = {"export_s": round(seconds, 1), "bytes": gguf_file.stat().st_size,
                        **closeness(merged, back, batches)}
        del back
    out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with open(ROOT / "bench" / "results_chat.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(out, ensure_ascii=False) + "\n")
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
