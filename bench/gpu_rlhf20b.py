"""The whole imdb-rlhf chain at the 20B shape, through the real CLI, held to a 24 GB card.

Runs `shomin run imdb-rlhf` as shipped, on stand-ins for what it downloads:
  - model: a random-weight checkpoint of EleutherAI/gpt-neox-20b's shape (fp16, ~41 GB)
    with a byte-level BPE tokenizer trained on the project's data/;
  - reward: a random classifier of lvwerra/distilbert-imdb's shape (DistilBERT, labels
    NEGATIVE/POSITIVE) with a WordPiece tokenizer trained on data/;
  - data: data/movie-reviews.jsonl instead of stanfordnlp/imdb;
with `device_memory_gib=22.4` (a 24 GB card's usable memory: the plan checks against it and
torch is capped to it) and short step counts. Every stage the pipeline declares runs.
Then it reads summary.json: each stage's status, seconds, peak GPU memory (allocated and
reserved) and peak host memory, against the memory plan env_check made (plan.txt).

Usage (on one GPU with ~45 GB of free disk and ~45 GB of free host RAM for the merge):
    python bench/gpu_rlhf20b.py [--work DIR] [--runs DIR] [--set KEY=VALUE ...]
    python bench/gpu_rlhf20b.py --detach ...    # start in the background, log to DIR/chain.log
    python bench/gpu_rlhf20b.py --follow ...    # print the log until the chain ends; rerunnable
The merged fp16 model is another ~41 GB: --runs puts the run folders elsewhere (e.g. a
RAM disk) when the checkpoint and the merged model do not fit one disk. A rerun after an
interruption resumes: finished stages are cached, sft and ppo resume from checkpoints.
Writes DIR/rlhf20b.json and prints a table. A benchmark: it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
CAP_GIB = 22.4
SHORT = ["stages.sft.max_steps=4", "stages.sft.save_steps=2", "stages.ppo.steps=2", "stages.ppo.save_steps=1",
         "stages.evaluate.max_rows=8", "stages.evaluate.num_prompts=2", "stages.evaluate.reward_prompts=4",
         "stages.evaluate.samples_per_query=2", "dataset.eval_fraction=0.1"]


def corpus() -> list[str]:
    texts = []
    for path in sorted((ROOT / "data").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    return texts


def make_policy_model(folder: Path, shape: str) -> None:
    """gpt-neox-20b's shape (or bench/shapes.py's `tiny`, for a dry run), random fp16 weights made
    on the GPU, a BPE tokenizer from data/."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    from shapes import SHAPES
    if (folder / "config.json").exists():
        return
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=8192, min_frequency=2, special_tokens=["<|endoftext|>", "<|padding|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|padding|>")
    model_type, kw = SHAPES[shape]
    kw = {**kw, "vocab_size": max(kw.get("vocab_size", 0), len(tok))}   # gpt-neox-20b's 50432 rows; the BPE uses 8192
    config = AutoConfig.for_model(model_type, **kw, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    t = time.time()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(folder, max_shard_size="4GB")
    tok.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    print(f"policy checkpoint written in {time.time() - t:.0f}s", flush=True)


def make_classifier(folder: Path) -> None:
    """lvwerra/distilbert-imdb's shape (DistilBERT base, NEGATIVE/POSITIVE), random weights."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, PreTrainedTokenizerFast
    if (folder / "config.json").exists():
        return
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(corpus(), vocab_size=8000, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok = PreTrainedTokenizerFast(tokenizer_object=wp, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    config = DistilBertConfig(vocab_size=30522, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                              label2id={"NEGATIVE": 0, "POSITIVE": 1})
    DistilBertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def shim(work: Path) -> Path:
    """A `shomin` package made of this checkout's flows/ and tasks/, for machines without
    `pip install -e .`; first on PYTHONPATH, so this checkout is what runs."""
    pkg = work / "pkg" / "shomin"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").touch()
    for name in ("flows", "tasks"):
        if not (pkg / name).exists():
            (pkg / name).symlink_to(ROOT / name)
    return pkg.parent


def run_chain(work: Path, runs: Path, extra: list[str], shape: str) -> int:
    model, classifier = work / f"{shape}-bpe", work / "distilbert-imdb-shape"
    make_policy_model(model, shape)
    make_classifier(classifier)
    if not (work / "data").exists():
        (work / "data").symlink_to(ROOT / "data")
    sets = [f"model.source={model}", "dataset.source=data/movie-reviews.jsonl", f"stages.ppo.reward.model={classifier}",
            f"device_memory_gib={CAP_GIB}", f"output_dir={runs}", *SHORT, *extra]
    cmd = [sys.executable, "-m", "shomin.flows.cli", "run", "-f", str(ROOT / "pipelines.yaml"), "imdb-rlhf", "--quiet"]
    for kv in sets:
        cmd += ["--set", kv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim(work)), env.get("PYTHONPATH")]))
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=work, env=env)
    report(work, runs, rc, time.time() - t0)
    return rc


def report(work: Path, runs: Path, rc: int, wall: float) -> None:
    found = sorted((runs / "imdb-rlhf").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        print(json.dumps({"status": "no run", "returncode": rc}))
        return
    summary = json.loads(found[-1].read_text())
    stages = summary.get("stages", {})
    plan = {}
    env_json = Path(found[-1].parent / "env_check" / "env.json")
    if env_json.exists():
        plan = {k: v["total"] / 2**30 for k, v in json.loads(env_json.read_text())["plan"]["stages"].items()}
    rows = {}
    for name, st in stages.items():
        m = st.get("metrics") or {}
        rows[name] = {"status": st.get("status"), "seconds": round(st.get("seconds") or 0.0, 1),
                      "peak_gpu_gib": round(m["peak_gpu_gib"], 2) if "peak_gpu_gib" in m else None,
                      "peak_gpu_reserved_gib": round(m["peak_gpu_reserved_gib"], 2) if "peak_gpu_reserved_gib" in m else None,
                      "peak_host_gib": round(m["peak_host_gib"], 2) if "peak_host_gib" in m else None,
                      "plan_gib": round(plan[name], 2) if name in plan else None}
    result = {"pipeline": "imdb-rlhf", "cap_gib": CAP_GIB, "status": summary.get("status"),
              "returncode": rc, "wall_s": round(wall, 1), "run_dir": str(found[-1].parent), "stages": rows,
              "all_under_cap": all((r["peak_gpu_reserved_gib"] or 0) <= CAP_GIB for r in rows.values())}
    (work / "rlhf20b.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    print(f"{'stage':12} {'status':10} {'seconds':>8} {'GPU peak':>9} {'reserved':>9} {'plan':>7} {'host peak':>9}")
    for name, r in rows.items():
        def f(x):
            return "—" if x is None else f"{x:.2f}"
        print(f"{name:12} {r['status'] or '':10} {r['seconds']:8.0f} {f(r['peak_gpu_gib']):>9} "
              f"{f(r['peak_gpu_reserved_gib']):>9} {f(r['plan_gib']):>7} {f(r['peak_host_gib']):>9}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.environ.get("BENCH_DIR", "/tmp/bench"), help="checkpoints, log, result")
    ap.add_argument("--runs", help="run folders (default WORK/runs)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--shape", default="neox20b", help="bench/shapes.py shape (tiny: a dry run of the whole path)")
    ap.add_argument("--detach", action="store_true", help="start in the background and return")
    ap.add_argument("--follow", type=float, metavar="SECONDS", help="print the log for at most SECONDS or until done")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs or work / "runs")
    log = work / "chain.log"
    if args.detach:
        argv = [sys.executable, __file__, "--work", str(work), "--runs", str(runs), "--shape", args.shape] \
            + sum((["--set", s] for s in args.set), [])
        with open(log, "a") as out:
            subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        print(f"started; log: {log}")
        return 0
    if args.follow is not None:   # until the chain's result line, or SECONDS
        deadline, pos = time.time() + args.follow, 0
        while time.time() < deadline:
            text = log.read_text() if log.exists() else ""
            print(text[pos:], end="", flush=True)
            pos = len(text)
            if '"returncode"' in text:
                return 0
            time.sleep(10)
        return 0
    return run_chain(work, runs, args.set, args.shape)


if __name__ == "__main__":
    sys.exit(main())
