"""Stage evaluate: did fine-tuning help? Held-out loss and perplexity of the base
and of the result, the same prompts answered before and after side by side,
and for RLHF pipelines the reward before/after PPO and the policy's KL to its
reference. Writes eval.json (numbers) and eval.md (for people).

The loss is computed exactly as SFT trained it: on the completion tokens only
for instruction data, on every token for plain text.
"""
from __future__ import annotations

import gc
import math
import time
from pathlib import Path

import torch

from tasks.config import EvaluateSettings, ModelSpec, PpoSettings
from tasks.data import DataResult, read_jsonl
from tasks.model import (ModelResult, OutOfMemory, load_causal_lm, load_tokenizer, oom_message, planned_peak_gib,
                         resolve_device)
from tasks.rundir import StageResult, staged_dir, write_json, write_text


class EvalResult(StageResult):
    eval_json: str
    eval_md: str


def _encode(tok, row: dict, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where no loss is taken)."""
    if "prompt" in row:
        p = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, labels = p + c, [-100] * len(p) + c
    else:
        ids = tok(row["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = list(ids)
    return ids[:max_len], labels[:max_len]


@torch.no_grad()
def heldout_loss(model, tok, rows: list[dict], settings: EvaluateSettings, device: str) -> float:
    """Token-weighted mean cross-entropy over the held-out rows."""
    model.eval()
    total, count = 0.0, 0
    enc = [_encode(tok, r, settings.max_seq_length) for r in rows[: settings.max_rows]]
    for i in range(0, len(enc), settings.batch_size):
        batch = enc[i: i + settings.batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for j, (x, y) in enumerate(batch):
            ids[j, : len(x)], labels[j, : len(y)], attn[j, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                                 shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((shift_labels != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def answer(model, tok, prompts: list[str], max_new_tokens: int, device: str) -> list[str]:
    """Greedy answers, so before/after differ only by the weights."""
    model.eval()
    tok.padding_side = "left"
    out = []
    from tqdm.auto import tqdm
    for p in tqdm(prompts, desc="answers", leave=False):
        x = tok(p, return_tensors="pt").to(device)
        y = model.generate(**x, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(y[0, x["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def _measure(model, tok, rows, prompts, settings, device) -> tuple[float, list[str]]:
    return heldout_loss(model, tok, rows, settings, device), answer(model, tok, prompts, settings.max_new_tokens, device)


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(settings: EvaluateSettings, spec: ModelSpec, model_res: ModelResult, data: DataResult, out_dir: str | Path,
        **kwargs) -> EvalResult:
    try:
        return _run(settings, spec, model_res, data, out_dir, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemory(oom_message("evaluate", settings, planned_peak_gib(out_dir, "evaluate"))) from None


def _run(settings: EvaluateSettings, spec: ModelSpec, model_res: ModelResult, data: DataResult, out_dir: str | Path,
         *, adapter_path: str | None = None, merged_path: str | None = None, ppo_adapter_path: str | None = None,
         ppo_settings: PpoSettings | None = None, device: str = "auto", seed: int = 42) -> EvalResult:
    t0 = time.time()
    device = resolve_device(device)
    torch.manual_seed(seed)
    tok = load_tokenizer(model_res.tokenizer_path, spec.trust_remote_code)
    rows = read_jsonl(data.eval_path)
    prompts = [r.get("prompt", r.get("text", "")[:60]) for r in rows[: settings.num_prompts]]

    base = load_causal_lm(model_res.model_path, spec, device)
    loss_before, answers_before = _measure(base, tok, rows, prompts, settings, device)
    if merged_path is None and adapter_path is not None:
        from peft import PeftModel
        after = PeftModel.from_pretrained(base, adapter_path)
    else:
        _free(base)
        after = load_causal_lm(merged_path, spec, device) if merged_path else None
    report: dict = {"loss_before": loss_before, "perplexity_before": math.exp(min(loss_before, 50)),
                    "n_eval_rows": min(len(rows), settings.max_rows)}
    answers_after = None
    if after is not None:
        loss_after, answers_after = _measure(after, tok, rows, prompts, settings, device)
        report.update(loss_after=loss_after, perplexity_after=math.exp(min(loss_after, 50)))
        _free(after)

    rlhf = None
    if ppo_adapter_path and merged_path and ppo_settings is not None and settings.reward_prompts:
        from tasks.ppo import build_queries, evaluate_policy
        queries = build_queries(data.eval_path, tok, ppo_settings, seed)[: settings.reward_prompts]
        rlhf = evaluate_policy(merged_path, ppo_adapter_path, spec, ppo_settings, queries, device=device, seed=seed)
        report.update(reward_sft=rlhf["reward_sft"], reward_ppo=rlhf["reward_ppo"], kl_ppo=rlhf["kl_ppo"])

    samples = [{"prompt": p, "before": b, "after": a}
               for p, b, a in zip(prompts, answers_before, answers_after or [None] * len(prompts))]
    with staged_dir(out_dir) as tmp:
        write_json(tmp / "eval.json", {**report, "samples": samples, "rlhf_samples": (rlhf or {}).get("samples", [])})
        write_text(tmp / "eval.md", render_markdown(report, samples, rlhf))
    out = Path(out_dir)
    metrics = {k: float(v) for k, v in report.items() if isinstance(v, (int, float))}
    return EvalResult(stage="evaluate", output_dir=str(out), eval_json=str(out / "eval.json"),
                      eval_md=str(out / "eval.md"), metrics=metrics,
                      artifacts={"eval_json": str(out / "eval.json"), "eval_md": str(out / "eval.md")},
                      seconds=time.time() - t0)


def _cell(text: str | None) -> str:
    return "—" if text is None else text.replace("|", "\\|").replace("\n", "<br>")[:300]


def render_markdown(report: dict, samples: list[dict], rlhf: dict | None) -> str:
    lines = ["# Evaluation", "", "| metric | before | after |", "|---|---|---|"]
    for name in ("loss", "perplexity"):
        after = report.get(f"{name}_after")
        lines.append(f"| held-out {name} | {report[f'{name}_before']:.4f} | "
                     f"{'—' if after is None else f'{after:.4f}'} |")
    if rlhf:
        lines.append(f"| mean reward (SFT → PPO) | {rlhf['reward_sft']:.4f} | {rlhf['reward_ppo']:.4f} |")
        lines.append(f"| KL to reference, nats | 0 | {rlhf['kl_ppo']:.4f} |")
    lines += ["", "## Answers before and after", "", "| prompt | before | after |", "|---|---|---|"]
    lines += [f"| {_cell(s['prompt'])} | {_cell(s['before'])} | {_cell(s['after'])} |" for s in samples]
    if rlhf and rlhf.get("samples"):
        lines += ["", "## Before and after PPO", "", "| query | SFT | PPO |", "|---|---|---|"]
        lines += [f"| {_cell(s['query'])} | {_cell(s['sft'])} ({s['reward_sft']:.2f}) | "
                  f"{_cell(s['ppo'])} ({s['reward_ppo']:.2f}) |" for s in rlhf["samples"][:8]]
    return "\n".join(lines) + "\n"
