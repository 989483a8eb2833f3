"""The env_check memory plan against the peaks measured on the GPU (bench/results.json).

Runs on any machine (the shapes are built on the meta device). Usage: python bench/plan_check.py
Prints predicted vs measured peak per configuration and the error; the issue's bar is +-15%.
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import checkout  # noqa: E402,F401 - shomin from this checkout
from shomin.tasks import registry  # noqa: E402
from shomin.tasks.registry import plan_memory  # noqa: E402
from transformers import AutoConfig  # noqa: E402

Pipeline = registry.models()[0]
from shapes import SHAPES  # noqa: E402
from shomin.tasks.models.memory import shape_from_config  # noqa: E402

GIB = 2 ** 30


def shape(arch):
    model_type, kw = SHAPES[arch]
    return shape_from_config(AutoConfig.for_model(model_type, **kw))


STOCK_LEVERS = {"kernels": "none", "fused_lora": False, "frozen_dtype": "float32", "offload_checkpoints": False}


def sft_pipeline(ckpt: bool, levers: dict, batch: int = 4, seq: int = 2048) -> Pipeline:
    return Pipeline.model_validate({
        "name": "bench", "device": "cuda",
        "model": {"source": "x/y", "quantization": "4bit", "dtype": "bfloat16", "compute_dtype": "bfloat16"},
        "stages": {"model_init": {}, "dataset": {}, "sft": {
            "lora": {"r": 16, "alpha": 16, "target_modules": "all-linear"}, "micro_batch_size": batch, "batch_size": batch,
            "max_seq_length": seq, "gradient_checkpointing": ckpt, **levers}},
        "dataset": {"source": "x.jsonl"}})


def sft_rows(results: dict) -> list[tuple[str, float, float]]:
    """The SFT configurations measured on the GPU: the four shapes (stock and shomin's defaults, and
    mlp_chunk_tokens 2048), the long-context lengths, the stock recipe without checkpointing."""
    def planned(arch, levers, batch=4, seq=2048, ckpt=True):
        return plan_memory(sft_pipeline(ckpt, levers, batch, seq), shape(arch), "cuda", None, None).stages["sft"]["total"] / GIB
    rows = []
    for r in results["sft_round2"]["table"]:
        rows.append((f"sft {r['arch']} stock", planned(r["arch"], STOCK_LEVERS), r["stock_peak_gib"]))
        rows.append((f"sft {r['arch']} shomin", planned(r["arch"], {}), r["shomin_peak_gib"]))
    for r in results["sft_round2"]["chunk2048"]:
        rows.append((f"sft {r['arch']} shomin chunk2048", planned(r["arch"], {"mlp_chunk_tokens": 2048}), r["peak_gib"]))
    long = results["long_context"]
    for point in long["points"]:
        rows.append((f"sft {long['arch']} b1 s{point['seq']}", planned(long["arch"], {}, 1, point["seq"]), point["peak_gib"]))
    rows.append(("sft neox7b stock, no ckpt", planned("neox7b", STOCK_LEVERS, ckpt=False),
                 results["sft"]["nockpt_neox7b"]["peak_alloc_gib"]))
    return rows


def ppo_pipeline(quant: str, checkpointing: bool | str, int4_matmul: str = "bitsandbytes") -> Pipeline:
    return Pipeline.model_validate({
        "name": "bench", "device": "cuda", "model": {"source": "x/y", "dtype": "float16", "int4_matmul": int4_matmul},
        "stages": {"model_init": {}, "dataset": {}, "sft": {}, "merge": {}, "ppo": {
            "quantization": quant, "gradient_checkpointing": checkpointing, "batch_size": 16, "mini_batch_size": 4, "query_max_tokens": 12,
            "response_min_tokens": 16, "response_max_tokens": 16,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["query_key_value"]}}},
        "dataset": {"source": "x.jsonl"}})


def main():
    results = json.loads((HERE / "results.json").read_text())
    rows = sft_rows(results)
    s = shape("neox20b")
    for run in results["ppo_trl011"]["rows"]:   # bench/gpu_ppo_trl011.sh
        plan = plan_memory(ppo_pipeline(run["quant"], run["checkpointing"]), s, "cuda", None, None)
        name = f"ppo neox20b {run['quant']}" + (" ckpt" if run["checkpointing"] else "")
        rows.append((name, plan.stages["ppo"]["total"] / GIB, run["ppo_peak_gib"]))
    for run in results["int4_triton"]["rows"]:   # the shipped kernel, side by side with TRL (H, J)
        if run["run"] in ("H", "J"):
            plan = plan_memory(ppo_pipeline("4bit", run["checkpointing"], "triton"), s, "cuda", None, None)
            mode = {True: " ckpt", "selective": " selective"}.get(run["checkpointing"], "")
            rows.append((f"ppo neox20b 4bit triton{mode} ({run['run']})", plan.stages["ppo"]["total"] / GIB,
                         run["peak_alloc_gib"]))
    print(f"{'configuration':38} {'plan GiB':>9} {'measured':>9} {'error':>7}")
    out = []
    for name, pred, meas in rows:
        err = (pred - meas) / meas
        out.append({"config": name, "predicted_gib": round(pred, 2), "measured_gib": meas, "error": round(err, 3)})
        print(f"{name:38} {pred:9.2f} {meas:9.2f} {err:+7.1%}")
    results["plan_vs_measured"] = out
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
