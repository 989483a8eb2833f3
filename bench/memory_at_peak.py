"""What is alive on the GPU at a run's peak, by the code that allocated it.

Reads a snapshot written by `torch.cuda.memory._dump_snapshot` after
`torch.cuda.memory._record_memory_history(stacks="python")` (bench/gpu_ppo.py writes one when
BENCH_MEMORY_SNAPSHOT=FILE), replays its allocation trace, finds the moment the allocated total
is highest, and groups the blocks alive then by the first frame of shomin that made them (and
the library frame under it). Blocks allocated before the trace began (the weights) are one line.

Usage: python bench/memory_at_peak.py SNAPSHOT.pickle [TOP]
"""
import pickle
import sys
from collections import defaultdict

GIB = 2**30


def where(frames: list) -> str:
    """Who asked (the innermost shomin frame), what allocated (the innermost frame) and in which
    phase (the innermost frame of a stage or of the CUDA-graph step: warm-up or capture)."""
    own = next((f for f in frames if "/shomin/" in f["filename"] or "/tasks/" in f["filename"]
                or "/bench/" in f["filename"]), None)
    phase = next((f for f in frames if "/stages/" in f["filename"] or "cuda_graphs" in f["filename"]), None)
    inner = frames[0] if frames else None
    show = lambda f: f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" if f else "?"  # noqa: E731
    return f"{show(own)}  <-  {show(inner)}  [{show(phase)}]"


def peak_blocks(snapshot: dict) -> tuple[int, dict, int]:
    """(peak bytes seen in the trace, live blocks at that moment, bytes alive before the trace)."""
    trace = snapshot["device_traces"][0]
    live, total = {}, 0
    # blocks in the segments at dump time that the trace never allocated: alive before it began
    traced = {e["addr"] for e in trace if e["action"] == "alloc"}
    before = 0
    for segment in snapshot["segments"]:
        addr = segment["address"]
        for b in segment["blocks"]:   # a segment's blocks lie end to end from its address
            if b["state"] == "active_allocated" and addr not in traced:
                before += b["size"]
            addr += b["size"]
    best, best_live = -1, {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
            if total > best:
                best, best_live = total, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
    return best, best_live, before


def main():
    snapshot = pickle.load(open(sys.argv[1], "rb"))
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    best, live, before = peak_blocks(snapshot)
    groups = defaultdict(lambda: [0, 0])
    for e in live.values():
        g = groups[where(e.get("frames", []))]
        g[0] += e["size"]
        g[1] += 1
    print(f"alive before the trace (weights): {before / GIB:.3f} GiB; traced peak: {best / GIB:.3f} GiB "
          f"in {len(live)} blocks")
    for name, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{size / GIB:8.3f} GiB {n:6d}  {name}")


if __name__ == "__main__":
    main()
