"""The longest sequence that trains (batch 1, 2 steps, no out-of-memory) under a GPU memory
cap, found the way ../shared/bench/stock_qlora_sft.py's `maxctx` mode finds it for the stock
stack: doubling from START, then bisection down to RESOLUTION tokens (stock: 256).

Usage: python bench/maxctx.py ARCH CAP_GIB [START] [RESOLUTION] [VARIANT]
Each length runs `bench/gpu_sft.py ARCH SEQ 1 2 VARIANT` (default `default`: the SFT
stage's own defaults) in its own process capped with BENCH_CAP_GIB, so an OOM leaves
nothing behind for the next. Prints one line per length, then one JSON line with the
longest length, its tokens/s (the second step) and peak memory; appends both to
$OUT/maxctx.jsonl.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARCH, CAP = sys.argv[1], float(sys.argv[2])
START = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
RESOLUTION = int(sys.argv[4]) if len(sys.argv) > 4 else 256
VARIANT = sys.argv[5] if len(sys.argv) > 5 else "default"
OUT = Path(os.environ.get("OUT", "."))


def trial(seq: int) -> dict | None:
    """The gpu_sft.py result line at this length, or None when it ran out of memory."""
    env = dict(os.environ, BENCH_CAP_GIB=str(CAP))
    proc = subprocess.run([sys.executable, str(HERE / "gpu_sft.py"), ARCH, str(seq), "1", "2", VARIANT],
                          capture_output=True, text=True, env=env)
    log = proc.stdout + proc.stderr
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"arch"')]
    if proc.returncode == 0 and rows:
        print(f"seq {seq}: fits, {rows[-1]['tokens_per_s']} tok/s, peak {rows[-1]['peak_alloc_gib']} GiB", flush=True)
        return rows[-1]
    if "OutOfMemoryError" in log or "out of memory" in log:
        print(f"seq {seq}: OOM", flush=True)
        return None
    print(log[-4000:], flush=True)
    raise SystemExit(f"seq {seq} failed for another reason than memory")


def main():
    fits = {}
    lo, hi = 0, START
    while (row := trial(hi)) is not None:
        fits[hi] = row
        lo, hi = hi, hi * 2
    while hi - lo > RESOLUTION:
        mid = (lo + hi) // 2 // 256 * 256
        row = trial(mid)
        if row is not None:
            fits[mid] = row
            lo = mid
        else:
            hi = mid
    best = fits.get(lo, {})
    result = {"arch": ARCH, "mode": "maxctx", "impl": f"shomin[{VARIANT}]", "cap_gib": CAP, "max_seq": lo,
              "resolution": RESOLUTION, "tokens_per_s": best.get("tokens_per_s"), "s_per_step": best.get("s_per_step"),
              "peak_alloc_gib": best.get("peak_alloc_gib"), "gpu": best.get("gpu")}
    print(json.dumps(result), flush=True)
    with (OUT / "maxctx.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
