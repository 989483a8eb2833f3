"""Stage export: the run's result in the forms people take home — GGUF (f16 or q8_0) with an
Ollama Modelfile, one merged transformers folder, or the LoRA adapter — each with a model
card carrying the held-out figures, optionally pushed to the Hugging Face Hub.

It runs last, after evaluate, so the cards have the figures. `shomin export RUN` does the
same for any finished run (tasks/models/exporting.py holds the work for both).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from shomin.tasks.ground import hub
from shomin.tasks.ground.contract import Inputs, Stage, StageContext
from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.ground.outputs import run_model
from shomin.tasks.ground.records import StageResult
from shomin.tasks.ground.rundir import staged_dir
from shomin.tasks.ground.settings import Strict


class ExportSettings(Strict):
    formats: list[Literal["gguf", "merged", "adapter"]] = Field(
        default_factory=lambda: ["gguf"], min_length=1,
        description="What to write, each into export/<format>/: gguf (a .gguf file + Ollama Modelfile), merged "
                    "(one transformers folder, adapter merged in) or adapter (the LoRA adapter alone).")
    gguf_type: Literal["f16", "q8_0"] = Field("q8_0", description="GGUF tensor type: f16 (exact) or q8_0 (about half "
                                              "the size, within a stated tolerance; tests/test_gguf_export.py).")
    push_to_hub: str | None = Field(None, description="org/name of a Hub model repository to push the first of "
                                    "`formats` to (huggingface_hub; needs a token: HF_TOKEN or `hf auth login`).")
    private: bool = Field(True, description="Create the Hub repository private.")

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        if value is not None and not hub.is_hub_id(value):
            raise ValueError(f"{value!r} is not a Hub repository id (org/name)")
        return value


def run(ctx: StageContext, inputs: Inputs) -> StageResult:
    from shomin.tasks.models.exporting import export_run
    t0, settings, out = time.time(), ctx.settings, Path(ctx.out_dir)
    found = run_model(out.parent)   # this run's result, found as `shomin chat` and `shomin export` find it
    with staged_dir(out) as tmp:
        for fmt in settings.formats:
            export_run(found, fmt, tmp / fmt, settings.gguf_type)
    artifacts = {fmt: str(out / fmt) for fmt in settings.formats}
    metrics = {f"{fmt}_bytes": float(sum(f.stat().st_size for f in (out / fmt).rglob("*") if f.is_file()))
               for fmt in settings.formats}
    if settings.push_to_hub:
        artifacts["hub"] = hub.push_folder(out / settings.formats[0], settings.push_to_hub, settings.private)
    return StageResult(stage="export", output_dir=str(out), metrics=metrics, artifacts=artifacts,
                       seconds=time.time() - t0)


def check(pipeline, settings: ExportSettings, before_run: bool) -> None:
    """Refused before any work: an architecture the GGUF writer does not know (read from the
    config of a local model), and a push that cannot happen (hub off, or no token)."""
    if settings.push_to_hub and before_run:
        hub.check_can_push(f"stages.export.push_to_hub: {settings.push_to_hub}")
    if "gguf" in settings.formats:
        from shomin.tasks.models.gguf_export import check_supported
        local = Path(pipeline.model.source).expanduser()
        if (local / "config.json").is_file():
            try:
                check_supported(local)
            except ConfigError as e:
                raise ConfigError(f"stages.export.formats: gguf: {e}") from None


STAGE = Stage("export", ExportSettings, run, check=check, needs=("model_init",),
              uses=("sft", "merge", "ppo", "evaluate"), identity=("model",),
              help="GGUF (+ Ollama Modelfile), merged or adapter exports of the run's result, with model cards; "
                   "optionally pushed to the Hub.")
