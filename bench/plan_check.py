"""The env_check memory plan against the peaks measured on the GPU (bench/results.json).

Runs on any machine (the shapes are built on the meta device). Usage: python bench/plan_check.py
Prints predicted vs measured peak per configuration and the error; the issue's bar is +-15%.
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from transformers import AutoConfig  # noqa: E402

from tasks.config import Pipeline  # noqa: E402
from tasks.env_check import plan_memory, shape_from_config  # noqa: E402

SHAPES = {
    "llama7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)),
    "neox7b": ("gpt_neox", dict(hidden_size=4096, intermediate_size=16384, num_hidden_layers=32, num_attention_heads=32,
                                vocab_size=52224, max_position_embeddings=2048, rotary_pct=1.0, use_parallel_residual=False)),
    "neox20b": ("gpt_neox", dict(hidden_size=6144, intermediate_size=24576, num_hidden_layers=44, num_attention_heads=64,
                                 vocab_size=50432, max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True)),
}
GIB = 2 ** 30


def shape(arch):
    model_type, kw = SHAPES[arch]
    return shape_from_config(AutoConfig.for_model(model_type, **kw))


def sft_pipeline(ckpt: bool) -> Pipeline:
    return Pipeline.model_validate({
        "name": "bench", "device": "cuda",
        "model": {"source": "x/y", "quantization": "4bit", "dtype": "bfloat16", "compute_dtype": "bfloat16"},
        "stages": {"model_init": {}, "dataset": {}, "sft": {
            "lora": {"r": 16, "alpha": 16, "target_modules": "all-linear"}, "micro_batch_size": 4, "batch_size": 4,
            "max_seq_length": 2048, "gradient_checkpointing": ckpt}},
        "dataset": {"source": "x.jsonl"}})


def ppo_pipeline(quant: str) -> Pipeline:
    return Pipeline.model_validate({
        "name": "bench", "device": "cuda", "model": {"source": "x/y", "dtype": "float16"},
        "stages": {"model_init": {}, "dataset": {}, "sft": {}, "merge": {}, "ppo": {
            "quantization": quant, "batch_size": 16, "mini_batch_size": 4, "query_max_tokens": 12,
            "response_min_tokens": 16, "response_max_tokens": 16,
            "lora": {"r": 16, "alpha": 32, "target_modules": ["query_key_value"]}}},
        "dataset": {"source": "x.jsonl"}})


def main():
    results = json.loads((HERE / "results.json").read_text())
    rows = []
    for arch in ("llama7b", "neox7b"):
        s = shape(arch)
        for name, ckpt in (("stock", True), ("shomin[nockpt]", False)):
            measured = results["sft"][arch].get(name)
            if measured:
                plan = plan_memory(sft_pipeline(ckpt), s, "cuda", None, None)
                rows.append((f"sft {arch} {name}", plan.stages["sft"]["total"] / GIB, measured["peak_alloc_gib"]))
    s = shape("neox20b")
    for run in results["ppo"]["runs"]:
        plan = plan_memory(ppo_pipeline(run["quant"]), s, "cuda", None, None)
        rows.append((f"ppo neox20b {run['quant']}", plan.stages["ppo"]["total"] / GIB, run["peak_alloc_gib"]))
    print(f"{'configuration':28} {'plan GiB':>9} {'measured':>9} {'error':>7}")
    out = []
    for name, pred, meas in rows:
        err = (pred - meas) / meas
        out.append({"config": name, "predicted_gib": round(pred, 2), "measured_gib": meas, "error": round(err, 3)})
        print(f"{name:28} {pred:9.2f} {meas:9.2f} {err:+7.1%}")
    results["plan_vs_measured"] = out
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
