"""Stock stack vs shomin's SFT stage on the same GPU, shapes, data and LoRA settings, in one run.

Usage: python bench/gpu_compare.py STOCK_SCRIPT ARCH SEQ BATCH STEPS VARIANT [VARIANT ...]
Runs STOCK_SCRIPT (../shared/bench/stock_qlora_sft.py) once, then bench/gpu_sft.py once per
VARIANT, each in its own process so peak memory is its own; prints a table of tokens/s,
peak allocated memory, their ratios to stock and the loss difference over the same first
steps; appends every row as JSON to $OUT/compare.jsonl (or ./compare.jsonl).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
stock_script, arch, seq, batch, steps, *variants = sys.argv[1:]
out_file = Path(os.environ.get("OUT", ".")) / "compare.jsonl"


def run(cmd: list[str]) -> tuple[dict, list[float]]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (out_file.parent / f"log_{arch}_{Path(cmd[1]).stem}_{cmd[-1]}.txt").write_text(log[-200000:])
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{\"arch\"")]
    if proc.returncode or not rows:
        print(log[-4000:], flush=True)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    # the Trainer's own log lines ({'loss': '6.2', ...}) carry the windowed losses
    losses = [float(x) for x in re.findall(r"'loss': '?([0-9.]+)", log)]
    return rows[-1], losses


stock, stock_losses = run([sys.executable, stock_script, arch, "qlora", seq, batch, steps])
stock["loss_windows"] = stock_losses
rows = [{"name": "stock", **stock}]
for v in variants:
    ours, _ = run([sys.executable, str(HERE / "gpu_sft.py"), arch, seq, batch, steps, v])
    ours.update(speed_ratio=round(ours["tokens_per_s"] / stock["tokens_per_s"], 3),
                memory_ratio=round(ours["peak_alloc_gib"] / stock["peak_alloc_gib"], 3),
                loss_diff=[round(a - b, 4) for a, b in zip(ours["loss_windows"], stock_losses)])
    rows.append({"name": f"shomin[{v}]", **ours})

with out_file.open("a") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
print(f"\n{arch} seq {seq} batch {batch}, {rows[0]['gpu']}")
print(f"{'run':22} {'tok/s':>8} {'peak GiB':>9} {'x speed':>8} {'x mem':>6}  loss (first windows)")
for r in rows:
    print(f"{r['name']:22} {r['tokens_per_s']:8d} {r['peak_alloc_gib']:9.2f} {r.get('speed_ratio', 1):8.2f} "
          f"{r.get('memory_ratio', 1):6.2f}  {r.get('loss_windows')}")
