"""Faults injected for real: a disk that fills up under a stage."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture
def small_disk(tmp_path):
    """A 48 KiB tmpfs: room for a run's summary, not for the dataset stage's ~60 KiB of JSONL."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:80]})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_fails_with_one_line_and_the_same_command_then_finishes(tmp_path, small_disk):
    data = ROOT / "data" / "movie-reviews.jsonl"
    (tmp_path / "pipelines.yaml").write_text(
        f"pipelines:\n  p:\n    output_dir: {small_disk}\n    model: {{source: x/y}}\n"
        f"    dataset: {{source: {data}, format: text, allow_extra_columns: true}}\n    stages:\n      dataset:\n",
        encoding="utf-8")
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "shomin.flows.cli", "run", "p"]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert first.returncode == 1, first.stderr[-2000:]
    (line,) = [x for x in first.stderr.splitlines() if x.startswith("shomin: stage")]   # shomin's own one line
    assert "no space left on the disk holding" in line and str(small_disk) in line and "free)" in line, line
    assert "it had written" in line and "run the same command again" in line, line
    (run,) = [p.parent for p in small_disk.glob("p/*/summary.json")]
    left = sorted(p.name for p in run.rglob("*"))
    # the run's own records only: no stage folder, no partial one, no temp file
    assert left == ["pipeline.json", "summary.json"], left
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"

    subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)], check=True)   # space freed
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr[-2000:]
    (run2,) = [p.parent for p in small_disk.glob("p/*/summary.json") if p.parent != run]
    summary = json.loads((run2 / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["stages"]["dataset"]["status"] == "completed"
    assert (run2 / "dataset" / "train.jsonl").stat().st_size > 48 * 1024 / 2
