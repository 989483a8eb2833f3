"""Model cards: the README.md the Hub shows for a model, beside every adapter, merged
model and export shomin writes.

A card says what a reader needs to trust and reuse the weights: the base model, the
data, the settings of the stages that made them, the held-out figures with their
standard errors, and the command that reproduces them. The metadata block is
huggingface_hub's ModelCardData, so the Hub reads `base_model`, `datasets` and
`library_name` from it as from any other card.
"""
from __future__ import annotations

import json
from pathlib import Path

from shomin.tasks.ground.hub import EMBEDDED_ORIGIN, is_hub_id
from shomin.tasks.ground.outputs import run_records
from shomin.tasks.ground.settings import EMBEDDED_PREFIX
LIBRARY = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}
SHOWN_STAGES = ("sft", "merge", "ppo")
HELD_OUT = (("loss_before", "held-out loss, base"), ("loss_after", "held-out loss, tuned"),
            ("loss_change", "change (paired)"), ("reward_sft", "mean reward, SFT"),
            ("reward_ppo", "mean reward, PPO"), ("reward_gain", "reward gain (paired)"),
            ("kl_ppo", "KL to the SFT model, nats"))


def base_model_id(source: str) -> str | None:
    """What the Hub calls the base model: a hub id as given, the origin of an embedded
    model; None for a local folder (its name would mean nothing to a reader)."""
    if source.startswith(EMBEDDED_PREFIX):
        return EMBEDDED_ORIGIN.get(source.removeprefix(EMBEDDED_PREFIX))
    return source if is_hub_id(source) else None


def _hub_dataset(source: str | None) -> str | None:
    return base_model_id(source) if source and not source.endswith((".jsonl", ".json", ".csv", ".parquet")) else None


def _metrics_table(metrics: dict) -> list[str]:
    rows = [(label, metrics[k], metrics.get(f"{k}_se")) for k, label in HELD_OUT if k in metrics]
    if not rows:
        return ["No evaluate stage ran, so there are no held-out figures."]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {label} | {v:.4f}" + ("" if se is None else f" ± {se:.4f}") + " |" for label, v, se in rows]
    n = metrics.get("n_eval_rows")
    return lines + ["", f"± is one standard error{f' across {int(n)} held-out rows' if n else ''}."]


def render_card(summary: dict, pipeline: dict, kind: str, what: str) -> str:
    """The card text for one folder of weights. kind: adapter | merged | gguf."""
    from huggingface_hub import ModelCard, ModelCardData
    model, dataset = pipeline.get("model") or {}, pipeline.get("dataset") or {}
    base = base_model_id(model.get("source", ""))
    data = ModelCardData(base_model=base, library_name=LIBRARY[kind], pipeline_tag="text-generation",
                         datasets=[d for d in [_hub_dataset(dataset.get("source"))] if d] or None,
                         tags=["shomin", kind] + (["lora"] if kind == "adapter" else []))
    stages = summary.get("stages") or {}
    evaluated = (stages.get("evaluate") or {}).get("metrics") or {}
    settings = {name: (pipeline.get("stages") or {}).get(name) for name in SHOWN_STAGES
                if (pipeline.get("stages") or {}).get(name) is not None}
    lines = [f"# {summary.get('pipeline', 'shomin')}: {what}", "",
             f"Made by shomin, pipeline `{summary.get('pipeline')}`, run "
             f"`{summary.get('run_id')}` ({summary.get('started_at', '')}).", "",
             f"- **Base model:** `{model.get('source')}`" + (f" (`{base}`)" if base and base != model.get("source") else ""),
             f"- **Data:** `{dataset.get('source')}` (format {dataset.get('format')}, "
             f"{int((stages.get('dataset') or {}).get('metrics', {}).get('n_train', 0))} training rows)"
             if dataset else "- **Data:** none", "",
             "## Held-out evaluation", "", *_metrics_table(evaluated), "",
             "## Settings", "", "```json", json.dumps(settings, indent=2, ensure_ascii=False), "```", "",
             "## Reproduce", "", "```bash", summary.get("command") or f"shomin run {summary.get('pipeline')}", "```", ""]
    return str(ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines)))


def write_card(folder: Path, run: Path, kind: str, what: str) -> Path:
    """README.md in `folder` for the weights a run made (its summary.json and pipeline.json)."""
    from shomin.tasks.ground.rundir import write_text
    summary, pipeline = run_records(run)
    path = Path(folder) / "README.md"
    write_text(path, render_card(summary, pipeline, kind, what))
    return path


# the weights each stage leaves: (stage, artifact, kind, what the card calls them)
RUN_WEIGHTS = (("sft", "adapter", "adapter", "LoRA adapter (SFT)"), ("merge", "merged", "merged", "merged model (SFT)"),
               ("ppo", "adapter", "adapter", "LoRA adapter (PPO policy, on the merged SFT model)"),
               ("ppo", "merged", "merged", "merged model (PPO policy)"))


def write_run_cards(run: Path) -> list[Path]:
    """Cards for the weights this run made itself, written once the run is over so that they
    carry its held-out figures. A cached stage's folder belongs to the run that made it and
    keeps that run's card. The stage folder's manifest is renewed to include the card."""
    from shomin.tasks.ground.rundir import write_manifest
    stages = run_records(run)[0].get("stages") or {}
    written = []
    for stage, artifact, kind, what in RUN_WEIGHTS:
        entry = stages.get(stage) or {}
        folder = (entry.get("artifacts") or {}).get(artifact)
        if entry.get("status") != "completed" or not folder or not Path(folder).is_dir():
            continue
        written.append(write_card(Path(folder), run, kind, what))
        write_manifest(Path(entry["output_dir"]))
    return written
