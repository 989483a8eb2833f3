"""Stage merge: fold the SFT adapter into the *original* base at 16-bit.

Merging into a quantized base would bake quantization error into the new
weights (and bitsandbytes layers cannot be merged exactly), so the base is
reloaded from its source folder unquantized, in the merge dtype, whatever the
pipeline trained with. The result is a plain transformers checkpoint.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import Field
from shomin.tasks.ground.contract import Inputs, Stage, StageContext
from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.ground.records import MergeResult, ModelResult
from shomin.tasks.ground.rundir import staged_dir, write_json
from shomin.tasks.ground.settings import Strict
from shomin.tasks.models import memory as mem
from shomin.tasks.models.loading import DTYPES, load_causal_lm, load_tokenizer


class MergeSettings(Strict):
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="Dtype the original base is loaded and merged in.")
    max_shard_size: str = Field("2GB")


def check_adapter_matches(adapter_path: str | Path, model_res: ModelResult) -> None:
    """Refuse an adapter trained on another base: same name and shapes or nothing."""
    conf = json.loads((Path(adapter_path) / "adapter_config.json").read_text())
    base = conf.get("base_model_name_or_path")
    if base and Path(base).name != Path(model_res.model_path).name and base != model_res.model_path:
        raise ConfigError(f"merge: adapter {adapter_path} was trained on '{base}', "
                          f"not on this pipeline's base '{model_res.model_path}'")
    # Same folder name is not the same model: where the adapter's base is still on disk, compare shapes.
    theirs, ours = Path(str(base or "")) / "config.json", Path(model_res.model_path) / "config.json"
    if base and theirs.is_file() and ours.is_file():
        a, b = json.loads(theirs.read_text()), json.loads(ours.read_text())
        for key in SHAPE_KEYS:
            if a.get(key) != b.get(key):
                raise ConfigError(f"merge: adapter {adapter_path} was trained on '{base}' with {key}={a.get(key)}, "
                                  f"but this pipeline's base '{model_res.model_path}' has {key}={b.get(key)}")


SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")


def _mismatch(e: RuntimeError) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(e).__name__)


def run(ctx: StageContext, inputs: Inputs) -> MergeResult:
    from peft import PeftModel
    t0, settings, spec = time.time(), ctx.settings, ctx.model
    model_res, sft = inputs["model_init"], inputs["sft"]
    check_adapter_matches(sft.adapter_path, model_res)
    base = load_causal_lm(model_res.model_path, spec, "cpu", quantization="none", dtype=DTYPES[settings.dtype])
    try:
        model = PeftModel.from_pretrained(base, sft.adapter_path)
    except RuntimeError as e:  # shape mismatch: adapter of a differently shaped model
        raise ConfigError(f"merge: adapter {sft.adapter_path} does not fit the base ({_mismatch(e)})") from None
    merged = model.merge_and_unload()
    tok = load_tokenizer(model_res.tokenizer_path, spec.trust_remote_code)
    with staged_dir(ctx.out_dir) as tmp:
        merged.save_pretrained(tmp / "model", safe_serialization=True, max_shard_size=settings.max_shard_size)
        tok.save_pretrained(tmp / "model")
        write_json(tmp / "merge.json", {"base": model_res.model_path, "adapter": sft.adapter_path,
                                        "dtype": settings.dtype})
    out = Path(ctx.out_dir)
    return MergeResult(stage="merge", output_dir=str(out), merged_path=str(out / "model"),
                       artifacts={"merged": str(out / "model")}, seconds=time.time() - t0)


def plan(settings: MergeSettings, inputs: mem.PlanInputs) -> dict:
    """The whole base at the merge dtype, in host RAM (merge always runs on the CPU)."""
    inputs.notes["merge.weights"] = f"{settings.dtype}, CPU RAM"
    return {"weights": inputs.shape["num_parameters"] * mem.DTYPE_BYTES[settings.dtype]}


STAGE = Stage("merge", MergeSettings, run, plan=plan, needs=("sft", "model_init"), memory="host",
              identity=("model",), advice="merge loads the whole base at 16-bit in CPU RAM; free RAM or use a smaller model",
              help="Fold the SFT adapter into the original base, reloaded unquantized at 16-bit.")
