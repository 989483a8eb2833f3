"""Stage evaluate: did fine-tuning help? Held-out loss and perplexity of the base
and of the result, the same prompts answered before and after side by side,
and for RLHF pipelines the reward before/after PPO and the policy's KL to its
reference. Writes eval.json (numbers) and eval.md (for people).

The loss is computed exactly as SFT trained it: on the completion tokens only
for instruction data, on the assistant turns for chat data, on every token for
plain text.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from pydantic import Field
from shomin.tasks.ground.contract import Inputs, Stage, StageContext
from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.ground.progress import progress
from shomin.tasks.ground.records import EvalResult, PolicyRecord
from shomin.tasks.ground.rundir import markdown_cell, read_jsonl, staged_dir, write_json, write_text
from shomin.tasks.ground.settings import RewardSettings, Strict
from shomin.tasks.ground.conversations import last_exchange
from shomin.tasks.models import chat
from shomin.tasks.models import memory as mem
from shomin.tasks.models import stats
from shomin.tasks.models.loading import free, load_causal_lm, load_tokenizer
from shomin.tasks.models.preference_eval import chosen_row


class EvaluateSettings(Strict):
    max_rows: int = Field(64, gt=0, description="Held-out rows for loss and perplexity.")
    batch_size: int = Field(8, gt=0)
    max_seq_length: int = Field(512, gt=0)
    num_prompts: int = Field(4, ge=0, description="Held-out prompts answered before and after, side by side.")
    max_new_tokens: int = Field(48, gt=0)
    reward_prompts: int = Field(32, ge=0, description="RLHF pipelines: held-out queries scored for reward and KL.")
    samples_per_query: int = Field(8, gt=0, description="RLHF pipelines: responses sampled per held-out query and side "
                                   "(SFT, PPO), with the same random numbers on both sides. The standard error of the "
                                   "gain falls about as 1/sqrt(this): 8 keeps it near 0.03 on imdb-rlhf-local's 36 queries.")
    judge: RewardSettings | None = Field(None, description="A second reward that judges the SFT model and the tuned "
                                         "policy on the same samples, one the policy was not trained on (e.g. vader on "
                                         "review data after PPO against a trained reward model); for a dpo policy, the "
                                         "only reward. Reported as judge_sft, judge_ppo, judge_gain.")
    preference_pairs: int = Field(64, ge=0, description="Preference data: held-out pairs judged by the tuned policy's "
                                  "implicit reward (log-ratio to the SFT model): pref_accuracy, pref_margin.")


def _encode(tok, row: dict, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where no loss is taken)."""
    if "messages" in row:
        ids, mask = chat.encode(tok, row["messages"], max_len)
        return ids, [i if m else -100 for i, m in zip(ids, mask)]
    if "prompt" in row:
        p = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, labels = p + c, [-100] * len(p) + c
    else:
        ids = tok(row["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = list(ids)
    return ids[:max_len], labels[:max_len]


@torch.no_grad()
def row_losses(model, tok, rows: list[dict], settings: EvaluateSettings, device: str) -> tuple[list[float], list[int]]:
    """Per held-out row: the summed cross-entropy of its trained tokens, and how many there are."""
    model.eval()
    sums: list[float] = []
    counts: list[int] = []
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
                                                 shift_labels.reshape(-1), ignore_index=-100, reduction="none")
        kept = shift_labels != -100
        sums += (loss.view_as(kept) * kept).sum(1).tolist()
        counts += kept.sum(1).tolist()
    return sums, counts


def questions(tok, rows: list[dict]) -> tuple[list[str], list[list[int]]]:
    """What each held-out row asks (shown in eval.md) and the ids the model is given: the prompt
    of an instruction row, the start of a text row, a conversation up to its last answer."""
    shown, ids = [], []
    for r in rows:
        if "messages" in r:
            history, _ = last_exchange(r["messages"])
            shown.append(history[-1]["content"])
            ids.append(chat.generation_prompt(tok, history))
        else:
            shown.append(r.get("prompt", r.get("text", "")[:60]))
            ids.append(tok(shown[-1])["input_ids"])
    return shown, ids


@torch.no_grad()
def answer(model, tok, prompts: list[list[int]], max_new_tokens: int, device: str) -> list[str]:
    """Greedy answers, so before/after differ only by the weights."""
    model.eval()
    out = []
    from tqdm.auto import tqdm
    for p in tqdm(prompts, desc="answers", leave=False):
        x = torch.tensor([p], device=device)
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=tok.pad_token_id)
        # a cut at max_new_tokens can end inside a multi-byte character: drop its replacement mark
        out.append(tok.decode(y[0, x.shape[1]:], skip_special_tokens=True).strip().rstrip("\ufffd"))
    return out


def _measure(model, tok, rows, prompts, settings, device) -> tuple[tuple[list[float], list[int]], list[str]]:
    return row_losses(model, tok, rows, settings, device), answer(model, tok, prompts, settings.max_new_tokens, device)


def _mean(losses: tuple[list[float], list[int]]) -> float:
    return sum(losses[0]) / sum(losses[1]) if sum(losses[1]) else math.nan


def loss_report(before: tuple[list[float], list[int]], after: tuple[list[float], list[int]] | None,
                max_seq_length: int = 0) -> dict:
    """Held-out loss before/after with standard errors across rows, and the paired change."""
    if not sum(before[1]):   # every completion cut off: a loss over no tokens means nothing
        raise ConfigError(f"stages.evaluate.max_seq_length: no held-out row keeps a scored token within "
                          f"{max_seq_length} tokens ({len(before[1])} rows); raise it")
    report = {"n_eval_rows": len(before[1])}
    for name, (sums, counts) in (("before", before), ("after", after)) if after else (("before", before),):
        loss, se = stats.ratio(sums, counts)
        report.update({f"loss_{name}": loss, f"loss_{name}_se": se, f"perplexity_{name}": math.exp(min(loss, 50))})
    if after:
        report["loss_change"], report["loss_change_se"] = stats.paired_ratio(before[0], after[0], before[1])
    return report


def run(ctx: StageContext, inputs: Inputs) -> EvalResult:
    """One model in memory at a time: the base, then the tuned model (the base itself under an
    adapter, or the merged model after the base is freed), then the PPO policy's own load."""
    t0, settings, spec, device = time.time(), ctx.settings, ctx.model, ctx.device
    torch.manual_seed(ctx.seed)
    model_res, data = inputs["model_init"], inputs["dataset"]
    sft, merged = inputs.get("sft"), inputs.get("merge")
    ppo = next((inputs[k] for k in POLICY_STAGES if k in inputs), None)   # the tuned policy, if any
    tok = load_tokenizer(model_res.tokenizer_path, spec.trust_remote_code)
    pairs = read_jsonl(data.eval_path) if data.format == "preference" else []
    rows = [chosen_row(r) for r in pairs] if pairs else read_jsonl(data.eval_path)
    shown, prompts = questions(tok, rows[: settings.num_prompts])

    phases = 1 + (merged is not None or sft is not None) + (ppo is not None and merged is not None)
    report = progress("evaluate", f"evaluate: {min(len(rows), settings.max_rows)} held-out rows, "
                      f"{len(prompts)} prompts, {phases} models", phases)
    model = load_causal_lm(model_res.model_path, spec, device)
    losses_before, answers_before = _measure(model, tok, rows, prompts, settings, device)
    report.update(1, {"loss_before": _mean(losses_before)})
    if merged is None and sft is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, sft.adapter_path)   # the same weights, adapter on
    else:
        del model
        free()
        model = load_causal_lm(merged.merged_path, spec, device) if merged else None
    losses_after = answers_after = None
    if model is not None:
        losses_after, answers_after = _measure(model, tok, rows, prompts, settings, device)
        report.update(2, {"loss_after": _mean(losses_after)})
    figures = loss_report(losses_before, losses_after, settings.max_seq_length)
    del model
    free()
    rlhf = _rlhf(ctx, tok, data.eval_path, merged, ppo, inputs.get("reward_model"))
    if rlhf:
        figures.update({k: v for k, v in rlhf.items() if k != "samples"})
        report.update(phases, {k: rlhf[k] for k in ("reward_gain", "kl_ppo") if k in rlhf})
    if pairs and ppo is not None and merged is not None and ctx.settings.preference_pairs:
        from shomin.tasks.models.preference_eval import preference_accuracy
        figures.update(preference_accuracy(merged.merged_path, ppo.adapter_path, spec,
                                           pairs[: ctx.settings.preference_pairs], device=device,
                                           quantization=_record(ctx, ppo).quantization))
    report.done(", ".join(f"{k} {figures[k]:.4f}" for k in ("loss_before", "loss_after", "reward_gain") if k in figures))
    samples = [{"prompt": p, "before": b, "after": a}
               for p, b, a in zip(shown, answers_before, answers_after or [None] * len(prompts))]
    return _write(ctx, figures, samples, rlhf, t0)


POLICY_STAGES = ("ppo", "grpo", "dpo")   # stages whose result is a policy LoRA on the merged model


def _record(ctx: StageContext, policy) -> PolicyRecord:
    """How to sample the policy: as its stage sampled (ppo, grpo), or plainly (dpo samples nothing)."""
    if getattr(policy, "policy", None) is not None:
        return policy.policy
    return PolicyRecord(quantization=ctx.model.quantization if ctx.model.quantization == "4bit" else "none",
                        reward=ctx.settings.judge or RewardSettings(), batch_size=ctx.settings.batch_size,
                        query_min_tokens=2, query_max_tokens=8, response_max_tokens=ctx.settings.max_new_tokens,
                        top_k=0, top_p=1.0, temperature=1.0)


def _rlhf(ctx: StageContext, tok, eval_path: str, merged, policy, reward_model) -> dict | None:
    """Reward (by the run's own reward, and by the judge) of the SFT model and the tuned policy,
    and the policy's KL, sampled as its stage sampled."""
    if policy is None or merged is None or not ctx.settings.reward_prompts:
        return None
    from shomin.tasks.models.reward import build_reward
    from shomin.tasks.models.rl import build_queries, evaluate_policy
    record = _record(ctx, policy)
    scorers = {}   # built only once the policy is freed: one model in memory at a time
    if getattr(policy, "policy", None) is not None:   # trained against a reward: judge by it
        trained = reward_model.model_path if reward_model else None
        scorers["reward"] = lambda: build_reward(record.reward, ctx.device, trained=trained)
    if ctx.settings.judge is not None:
        scorers["judge"] = lambda: build_reward(ctx.settings.judge, ctx.device)
    queries = build_queries(eval_path, tok, record, ctx.seed)[: ctx.settings.reward_prompts]
    return {**evaluate_policy(merged.merged_path, policy.adapter_path, ctx.model, record, queries, device=ctx.device,
                              seed=ctx.seed, samples=ctx.settings.samples_per_query, scorers=scorers),
            "policy_stage": policy.stage}


def _write(ctx: StageContext, report: dict, samples: list[dict], rlhf: dict | None, t0: float) -> EvalResult:
    with staged_dir(ctx.out_dir) as tmp:
        write_json(tmp / "eval.json", {**report, "samples": samples, "rlhf_samples": (rlhf or {}).get("samples", [])})
        write_text(tmp / "eval.md", render_markdown(report, samples, rlhf))
    out = Path(ctx.out_dir)
    metrics = {k: float(v) for k, v in report.items() if isinstance(v, (int, float))}
    return EvalResult(stage="evaluate", output_dir=str(out), eval_json=str(out / "eval.json"),
                      eval_md=str(out / "eval.md"), metrics=metrics,
                      artifacts={"eval_json": str(out / "eval.json"), "eval_md": str(out / "eval.md")},
                      seconds=time.time() - t0)


def pm(report: dict, name: str) -> str:
    """`value ± standard error` of a report entry (the error left out where there is none)."""
    value, se = report.get(name), report.get(f"{name}_se")
    if value is None:
        return "—"
    return f"{value:.4f}" + ("" if se is None or math.isnan(se) else f" ± {se:.4f}")


def render_markdown(report: dict, samples: list[dict], rlhf: dict | None) -> str:
    """Every figure with its standard error (± across held-out rows or queries); changes paired."""
    lines = ["# Evaluation", "", "| metric | before | after | change |", "|---|---|---|---|"]
    lines.append(f"| held-out loss ({report['n_eval_rows']} rows) | {pm(report, 'loss_before')} | "
                 f"{pm(report, 'loss_after')} | {pm(report, 'loss_change')} |")
    after = report.get("perplexity_after")
    lines.append(f"| held-out perplexity | {report['perplexity_before']:.4f} | "
                 f"{'—' if after is None else f'{after:.4f}'} | |")
    if rlhf:
        stage = rlhf.get("policy_stage", "ppo").upper()
        for name, what in (("reward", "mean reward"), ("judge", "mean judge score")):
            if f"{name}_sft" in rlhf:
                lines.append(f"| {what} (SFT → {stage}; {rlhf['n_queries']} queries x {rlhf['samples_per_query']} "
                             f"samples) | {pm(rlhf, f'{name}_sft')} | {pm(rlhf, f'{name}_ppo')} | {pm(rlhf, f'{name}_gain')} |")
        lines.append(f"| KL to reference, nats | 0 | {pm(rlhf, 'kl_ppo')} | |")
    if "pref_accuracy" in report:
        lines.append(f"| held-out pairs preferred by the implicit reward ({report['n_pairs']} pairs) | | "
                     f"{pm(report, 'pref_accuracy')} | |")
        lines.append(f"| implicit reward margin, chosen − rejected | 0 | {pm(report, 'pref_margin')} | |")
    lines += ["", "## Answers before and after", "", "| prompt | before | after |", "|---|---|---|"]
    lines += [f"| {markdown_cell(s['prompt'])} | {markdown_cell(s['before'])} | {markdown_cell(s['after'])} |" for s in samples]
    if rlhf and rlhf.get("samples"):
        lines += ["", "## Before and after PPO", "", "| query | SFT | PPO |", "|---|---|---|"]
        key = "reward" if "reward_sft" in rlhf else "judge"
        lines += [f"| {markdown_cell(s['query'])} | {markdown_cell(s['sft'])}{_score(s, f'{key}_sft')} | "
                  f"{markdown_cell(s['ppo'])}{_score(s, f'{key}_ppo')} |" for s in rlhf["samples"][:8]]
    return "\n".join(lines) + "\n"


def _score(sample: dict, key: str) -> str:
    return f" ({sample[key]:.2f})" if key in sample else ""


def plan(ev: EvaluateSettings, inputs: mem.PlanInputs) -> dict:
    """One model at a time: its weights + the larger of a no-grad forward (one layer's
    activations and the fp32 logits) and the answers' KV cache."""
    shape, act_b, w = inputs.shape, inputs.act_bytes, inputs.weights
    infer = round(mem.K_ACT * act_b / 2 * ev.batch_size * ev.max_seq_length * shape["hidden_size"]) \
        + mem.logits(ev.batch_size, ev.max_seq_length, shape, with_grad=False)
    gen = mem.kv_cache(max(ev.num_prompts, 1), ev.max_seq_length + ev.max_new_tokens, shape, act_b)
    inputs.notes["evaluate.weights"] = f"{inputs.spec.quantization}: model.quantization; one model at a time " \
        "(base, merged, policy, then each reward model: each freed before the next loads)"
    inputs.notes["evaluate.forward"] = "one layer's activations + fp32 logits, no grad"
    return {"weights": w, "forward": infer, "generation": gen, "total": w + max(infer, gen)}


STAGE = Stage("evaluate", EvaluateSettings, run, plan=plan, needs=("model_init", "dataset"), uses=("sft", "merge", "reward_model", *POLICY_STAGES),
              lower=("batch_size", "max_seq_length", "max_new_tokens"), advice="set model.quantization: 4bit",
              help="Held-out loss and answers before/after; for RLHF pipelines reward and KL before/after PPO.")
