"""The Prefect UI tells the story: a real server on loopback, a tiny pipeline run against it, and
the flow-run page rendered in headless Chromium shows the stages and the evaluation artifact.

Screenshots are kept in $SHOMIN_TEST_OUTPUT (default: test-output/ at the repository root).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import Browser, find_chromium
from tests.conftest import ROOT, tiny_chain

STAGES = ["env_check", "model_init", "dataset", "sft", "merge", "evaluate"]
SFT = "max_steps: 2, batch_size: 4, micro_batch_size: 4, max_seq_length: 48, learning_rate: 0.01, save_steps: 2, logging_steps: 1"
EVALUATE = "max_rows: 4, num_prompts: 2, max_new_tokens: 4, max_seq_length: 160"


def output_dir() -> Path:
    out = Path(os.environ.get("SHOMIN_TEST_OUTPUT", ROOT / "test-output"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flow_run_page_shows_stages_and_evaluation(tmp_path, tiny_model):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it)")
    from shomin.flows.server import start_prefect
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(tiny_chain(tiny_model, sft=SFT, evaluate=EVALUATE))
    server = start_prefect(tmp_path, port=None, timeout=120)
    try:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {
            "PYTHONPATH": str(ROOT), "PREFECT_API_URL": f"{server.url}/api", "HF_HUB_OFFLINE": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        r = subprocess.run([sys.executable, "-m", "shomin.flows.cli", "run", "tiny"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        (path,) = (tmp_path / "runs" / "tiny").glob("*/summary.json")
        summary = json.loads(path.read_text())
        flow_run_id, run_name = summary["prefect_flow_run_id"], f"tiny:{summary['run_id']}"
        report = json.loads(Path(summary["stages"]["evaluate"]["artifacts"]["eval_json"]).read_text())

        out = output_dir()
        with Browser(chromium) as b:
            b.navigate(f"{server.url}/runs/flow-run/{flow_run_id}")
            b.wait_for_text([run_name, "Completed", "Task Runs", "Artifacts"], timeout=60)
            b.click_text("Task Runs")
            text = b.wait_for_text(STAGES, timeout=30)
            assert text.count("Completed") >= len(STAGES)
            b.screenshot(out / "prefect-flow-run-task-runs.png")
            b.click_text("Artifacts")
            b.wait_for_text(["tiny-evaluation", "metrics before / after", "tiny-generations", "tiny-stages",
                             "tiny-mlflow"], timeout=30)
            shot = b.screenshot(out / "prefect-flow-run-artifacts.png")
            # the evaluation table itself
            b.click_text("tiny-evaluation")
            b.wait_for_text(["loss", "perplexity", "before", "after", "change",
                             f"{report['loss_before']:.4g}", f"{report['loss_after']:.4g}"], timeout=30)
            b.screenshot(out / "prefect-evaluation-artifact.png")
        assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        server.stop()
