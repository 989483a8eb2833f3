"""The README's picture of a run being watched: imdb-rlhf-local (short: 4 SFT steps, 12 PPO
steps) against a real Prefect server on loopback, and the flow run's Logs tab in headless
Chromium taken while the PPO stage is running, with the progress line of that moment.

    .venv/bin/python bench/watch_screenshot.py      # writes bench/screens/prefect-logs-during-ppo.png
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import checkout  # noqa: F401  (shomin importable from a checkout)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.browser import Browser, find_chromium  # noqa: E402

OVERRIDES = ["stages.sft.max_steps=4", "stages.ppo.steps=12", "stages.evaluate.reward_prompts=4",
             "stages.evaluate.samples_per_query=1"]


def main() -> None:
    from shomin.flows.server import start_prefect
    work = Path(tempfile.mkdtemp(prefix="shomin-watch-"))   # the server's state; the run's is in runs/ as usual
    server = start_prefect(work, port=None, timeout=120)
    env = os.environ | {"PREFECT_API_URL": f"{server.url}/api", "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "shomin.flows.cli"]
    try:
        before = set((ROOT / "runs" / "imdb-rlhf-local").glob("*/summary.json"))
        run = subprocess.Popen([*cli, "run", "imdb-rlhf-local", "--quiet", "--refresh", *[a for o in OVERRIDES for a in ("--set", o)]],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        progress = None
        while run.poll() is None:
            new = set((ROOT / "runs" / "imdb-rlhf-local").glob("*/summary.json")) - before
            found = [p.with_name("progress.json") for p in new if p.with_name("progress.json").exists()]
            state = json.loads(found[0].read_text()) if found else {}
            if state.get("stage") == "ppo" and (state.get("step") or 0) >= 4:
                progress = found[0]
                break
            time.sleep(1)
        assert progress is not None, "the run ended before PPO's fourth step"
        summary = json.loads((progress.parent / "summary.json").read_text())
        with Browser(find_chromium(), height=1300) as b:
            b.navigate(f"{server.url}/runs/flow-run/{summary['prefect_flow_run_id']}")
            b.wait_for_text(["Logs"], timeout=60)
            b.click_text("Logs")
            b.wait_for_text(["ppo step"], timeout=60)
            # the newest PPO line to the bottom of the view, the lines before it above
            b.evaluate("[...document.querySelectorAll('*')].filter(e => e.children.length === 0 && "
                       "e.textContent.trim().startsWith('ppo step')).pop().scrollIntoView({block: 'end'})")
            out = ROOT / "bench" / "screens" / "prefect-logs-during-ppo.png"
            out.parent.mkdir(exist_ok=True)
            b.screenshot(out, full_page=False)
        print(f"{out} at {json.loads(progress.read_text())['line']}")
        run.wait(timeout=900)
        print(f"run exited {run.returncode}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
