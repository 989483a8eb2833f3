"""Take a run's result home: as a LoRA adapter, as one merged transformers folder, or as a
GGUF file (f16 or q8_0) with an Ollama Modelfile, each with a model card.

`shomin export` and the export stage both call `export_run`, on the run's result as
tasks/ground/outputs.py finds it. Merging happens on the CPU in the dtype the weights
were saved in, so an export needs host memory for one copy of the model, no GPU.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from shomin.tasks.ground.cards import write_card
from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.ground.outputs import RunModel
from shomin.tasks.ground.rundir import staged_dir, write_text

Format = Literal["gguf", "merged", "adapter"]
GgufType = Literal["f16", "q8_0"]
FORMATS: tuple[str, ...] = ("gguf", "merged", "adapter")


def _copy_tokenizer(src: Path, dest: Path) -> None:
    from shomin.tasks.models.loading import load_tokenizer
    load_tokenizer(src).save_pretrained(dest)


def merge_into(found: RunModel, dest: Path) -> None:
    """One plain transformers folder: the result's weights with its adapter (if any) merged in."""
    if found.adapter is None:
        for item in found.weights.iterdir():
            if item.suffix in (".safetensors", ".json") and not item.name.startswith("."):
                shutil.copy2(item, dest / item.name)
    else:
        from peft import PeftModel
        from shomin.tasks.ground.settings import ModelSpec
        from shomin.tasks.models.loading import free, load_causal_lm
        base = load_causal_lm(found.weights, ModelSpec(source=str(found.weights)), "cpu", quantization="none",
                              dtype="auto")   # merged in the dtype the weights were saved in
        merged = PeftModel.from_pretrained(base, str(found.adapter)).merge_and_unload()
        merged.save_pretrained(dest, safe_serialization=True)
        del base, merged
        free()
    _copy_tokenizer(found.tokenizer, dest)


def _adapter_into(found: RunModel, dest: Path) -> None:
    """The last adapter the run trained: PPO's (on the merged SFT model), else SFT's (on the base)."""
    if found.last_adapter is None:
        raise ConfigError(f"{found.run}: the run trained no adapter (its result is the {found.kind} model); "
                          "use --format merged or gguf")
    shutil.copytree(found.last_adapter, dest, dirs_exist_ok=True)
    _copy_tokenizer(found.tokenizer, dest)


def _gguf_into(found: RunModel, dest: Path, outtype: GgufType, name: str) -> Path:
    import tempfile

    from shomin.tasks.models.gguf_export import check_supported, export_gguf, modelfile
    from shomin.tasks.models.loading import load_tokenizer
    check_supported(found.weights)   # before minutes of merging
    with tempfile.TemporaryDirectory(prefix="shomin-export-", dir=dest.parent) as tmp:
        merge_into(found, Path(tmp))
        path = export_gguf(Path(tmp), dest / f"{name}-{outtype}.gguf", outtype, name=name)
    write_text(dest / "Modelfile", modelfile(path.name, load_tokenizer(found.tokenizer)))
    return path


WHAT = {"gguf": "GGUF ({outtype}) for llama.cpp, Ollama and LM Studio", "merged": "merged model",
        "adapter": "LoRA adapter"}


def export_run(found: RunModel, fmt: Format, dest: Path, outtype: GgufType = "q8_0") -> Path:
    """Writes the export into `dest` (whole or not at all) and returns `dest`."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    name = found.pipeline.get("name") or found.run.parent.name
    with staged_dir(dest) as tmp:
        if fmt == "adapter":
            _adapter_into(found, tmp)
        elif fmt == "merged":
            merge_into(found, tmp)
        else:
            _gguf_into(found, tmp, outtype, name)
        what = WHAT[fmt].format(outtype=outtype) + f" of the {found.kind} result"
        write_card(tmp, found.run, fmt, what)
    return dest
