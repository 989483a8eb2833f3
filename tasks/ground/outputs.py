"""What a finished run produced, as a model someone can load: which folder holds the
weights, which adapter goes on top, which tokenizer, and how the run prompted it.

`shomin chat` and `shomin export` (and the export stage) read a run through this one
place, so "the result of a run" means the same thing everywhere: the PPO policy when
the run has one, else the merged model, else the base with the SFT adapter, else the
base model itself.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from shomin.tasks.ground.errors import ConfigError


@dataclass(frozen=True)
class RunModel:
    run: Path
    kind: str                 # "ppo", "merged", "sft adapter" or "base"
    weights: Path             # a transformers folder
    adapter: Path | None      # a PEFT adapter to put on `weights`, if any
    tokenizer: Path
    base: Path                # the pipeline's own starting model (for --compare)
    last_adapter: Path | None = None   # the last LoRA adapter the run trained (PPO's, else SFT's)
    pipeline: dict = field(default_factory=dict)   # the run's resolved pipeline (pipeline.json)

    @property
    def dataset_format(self) -> str:
        return ((self.pipeline.get("dataset") or {}).get("format")) or "chat"

    @property
    def template(self) -> dict:
        return (self.pipeline.get("dataset") or {}).get("template") or {}


def find_run(ref: str, workdir: str | Path = ".") -> Path:
    """A run folder from `runs/PIPELINE/RUN_ID`, `PIPELINE/RUN_ID`, or its path."""
    for candidate in (Path(ref), Path(workdir) / "runs" / ref):
        if (candidate / "summary.json").is_file():
            return candidate
    raise ConfigError(f"{ref}: no run there (expected a folder with summary.json, or PIPELINE/RUN_ID under runs/)")


def latest_completed(root: Path, pipeline: str) -> Path:
    """The newest run of a pipeline that completed (run ids sort by time)."""
    for summary in sorted((root / pipeline).glob("*/summary.json"), reverse=True):
        try:
            if json.loads(summary.read_text(encoding="utf-8")).get("status") == "completed":
                return summary.parent
        except (OSError, ValueError):
            continue
    raise ConfigError(f"{pipeline}: no completed run under {root / pipeline}; run `shomin run {pipeline}` first")


def run_records(run: Path) -> tuple[dict, dict]:
    """A run's summary.json and its resolved pipeline (pipeline.json; {} for runs made before it existed)."""
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    pipeline_file = run / "pipeline.json"
    pipeline = json.loads(pipeline_file.read_text(encoding="utf-8")) if pipeline_file.exists() else {}
    return summary, pipeline


def _artifact(stages: dict, stage: str, name: str) -> Path | None:
    entry = stages.get(stage) or {}
    value = (entry.get("artifacts") or {}).get(name) if entry.get("status") in ("completed", "cached") else None
    return Path(value) if value and Path(value).exists() else None


def run_model(run: Path) -> RunModel:
    """The run's result (see the module docstring); a ConfigError when nothing loadable is left."""
    summary, pipeline = run_records(run)
    stages = summary.get("stages") or {}
    base, tokenizer = _artifact(stages, "model_init", "model"), _artifact(stages, "model_init", "tokenizer")
    if base is None or tokenizer is None:
        raise ConfigError(f"{run}: the run has no model (its model_init stage did not complete, or its files are gone)")
    merged, sft, ppo = (_artifact(stages, "merge", "merged"), _artifact(stages, "sft", "adapter"),
                        _artifact(stages, "ppo", "adapter"))
    ppo_merged = _artifact(stages, "ppo", "merged")
    if ppo_merged:
        found = ("ppo", ppo_merged, None)
    elif ppo and merged:
        found = ("ppo", merged, ppo)
    elif merged:
        found = ("merged", merged, None)
    elif sft:
        found = ("sft adapter", base, sft)
    else:
        found = ("base", base, None)
    kind, weights, adapter = found
    return RunModel(run=run, kind=kind, weights=weights, adapter=adapter, tokenizer=tokenizer, base=base,
                    last_adapter=ppo or sft, pipeline=pipeline)
