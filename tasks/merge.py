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

from tasks.config import ConfigError, MergeSettings, ModelSpec
from tasks.model import DTYPES, ModelResult, load_causal_lm, load_tokenizer
from tasks.rundir import StageResult, staged_dir, write_json
from tasks.sft import SftResult


class MergeResult(StageResult):
    merged_path: str


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


def run(settings: MergeSettings, spec: ModelSpec, model_res: ModelResult, sft: SftResult,
        out_dir: str | Path) -> MergeResult:
    from peft import PeftModel
    t0 = time.time()
    check_adapter_matches(sft.adapter_path, model_res)
    base = load_causal_lm(model_res.model_path, spec, "cpu", quantization="none", dtype=DTYPES[settings.dtype])
    try:
        model = PeftModel.from_pretrained(base, sft.adapter_path)
    except RuntimeError as e:  # shape mismatch: adapter of a differently shaped model
        raise ConfigError(f"merge: adapter {sft.adapter_path} does not fit the base ({_mismatch(e)})") from None
    merged = model.merge_and_unload()
    tok = load_tokenizer(model_res.tokenizer_path, spec.trust_remote_code)
    with staged_dir(out_dir) as tmp:
        merged.save_pretrained(tmp / "model", safe_serialization=True, max_shard_size=settings.max_shard_size)
        tok.save_pretrained(tmp / "model")
        write_json(tmp / "merge.json", {"base": model_res.model_path, "adapter": sft.adapter_path,
                                        "dtype": settings.dtype})
    out = Path(out_dir)
    return MergeResult(stage="merge", output_dir=str(out), merged_path=str(out / "model"),
                       artifacts={"merged": str(out / "model")}, seconds=time.time() - t0)
