"""The PPO table of README "Benchmarks" from bench/gpu_ppo_trl011.sh's JSON lines.

Usage: python bench/ppo_table.py RUNS.jsonl [--results bench/results.json]

For each base (8-bit, 4-bit): seconds per step, rollout seconds, peak allocated GPU memory,
the weights as loaded and the overhead (peak - weights) for TRL 0.11 and shomin, and the
ratios the issue asks for (speed = TRL s/step / shomin s/step; overhead = shomin / TRL).
TRL 0.11's script prints no weights figure: both load the same checkpoint with the same
bitsandbytes settings, so its overhead is taken against the weights shomin measured after
loading (TRL's k-bit preparation, which copies embeddings and norms to float32, is overhead).
Writes the `ppo_trl011` entry of results.json (the other entries are left as they are).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pairs(lines: list[dict]) -> dict[tuple[str, bool | str], dict]:
    """(quant, shomin's gradient checkpointing: false, true or "selective") -> {"trl011": last TRL run, "shomin": last shomin run}."""
    trl = {row["quant"]: row for row in lines if row.get("impl", "").startswith("trl")}
    out: dict[tuple[str, bool], dict] = {}
    for row in lines:
        if "arch" in row:
            out[(row["quant"], row.get("checkpointing") or False)] = {"trl011": trl.get(row["quant"]), "shomin": row}
    return out


def entry(key: tuple[str, bool | str], runs: dict) -> dict | None:
    (quant, checkpointing), trl, ours = key, runs.get("trl011"), runs.get("shomin")
    if not (trl and ours):
        return None
    weights = ours["weights_gib"]
    trl_over, our_over = trl["peak_alloc_gib"] - weights, ours["peak_alloc_gib"] - weights
    return {"quant": quant, "checkpointing": checkpointing, "weights_gib": weights,
            "trl011_s_per_step": trl["s_per_step"], "ppo_s_per_step": ours["s_per_step"],
            "trl011_rollout_s": trl["rollout_s"], "ppo_rollout_s": ours["rollout_s"],
            "trl011_update_s": round(trl["s_per_step"] - trl["rollout_s"], 2), "ppo_update_s": ours["update_s"],
            "trl011_peak_gib": trl["peak_alloc_gib"], "ppo_peak_gib": ours["peak_alloc_gib"],
            "trl011_overhead_gib": round(trl_over, 2), "ppo_overhead_gib": round(our_over, 2),
            "speed_ratio": round(trl["s_per_step"] / ours["s_per_step"], 2),
            "overhead_ratio": round(our_over / trl_over, 2) if trl_over > 0 else None,
            "trl011_peak_reserved_gib": trl.get("peak_reserved_gib"), "ppo_peak_reserved_gib": ours.get("peak_reserved_gib"),
            "reserved_overhead_ratio": _ratio(ours.get("peak_reserved_gib"), trl.get("peak_reserved_gib"), weights),
            "cuda_graphs": ours.get("cuda_graphs"),
            "steps": ours["steps"], "gpu": ours["gpu"], "int8_matmul": ours.get("int8_matmul")}


def _ratio(ours: float | None, theirs: float | None, weights: float) -> float | None:
    """(ours - weights) / (theirs - weights): the overhead ratio on peak reserved memory."""
    if ours is None or theirs is None or theirs <= weights:
        return None
    return round((ours - weights) / (theirs - weights), 2)


def table(rows: list[dict]) -> str:
    lines = ["| base | implementation | s/step | rollout s | update s | weights GiB | peak GiB | overhead GiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        shomin = {True: "shomin, gradient checkpointing", "selective": "shomin, selective checkpointing"}.get(
            r["checkpointing"], "shomin, no checkpointing")
        for impl, name in (("trl011", "TRL 0.11.4 + PEFT (seed 003)"), ("ppo", shomin)):
            lines.append(f"| {r['quant']} | {name} | {r[f'{impl}_s_per_step']:.2f} | {r[f'{impl}_rollout_s']:.2f} | "
                         f"{r[f'{impl}_update_s']:.2f} | {r['weights_gib']:.2f} | {r[f'{impl}_peak_gib']:.2f} | "
                         f"{r[f'{impl}_overhead_gib']:.2f} |")
        lines.append(f"| {r['quant']} | **ratio** | **{r['speed_ratio']:.2f}x faster** | | | | | "
                     f"**{r['overhead_ratio']}x** |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results.json"))
    args = ap.parse_args()
    lines = [json.loads(x) for x in Path(args.runs).read_text().splitlines() if x.strip()]
    rows = sorted((e for key, runs in pairs(lines).items() if (e := entry(key, runs))),
                  key=lambda r: (r["quant"], str(r["checkpointing"])))
    print(table(rows))
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.exists() else {}
    earlier = {k: v for k, v in results.get("ppo_trl011", {}).items() if k.startswith("before_")}
    results["ppo_trl011"] = {"command": "TRL011=../shared/bench/trl011_ppo.py TRL011_SITE=... bash bench/gpu_ppo_trl011.sh "
                                        "(also the first part of bench/gpu_rlhf20b_all.sh)",
                             "date": time.strftime("%Y-%m-%d"), "rows": rows, **earlier}
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
