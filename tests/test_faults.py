"""Faults injected for real: a disk that fills up under a stage."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pathlib import Path

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


# ---------------------------------------------------------------- servers that die mid-run

SFT_LONG = ("max_steps: 40, batch_size: 4, micro_batch_size: 4, max_seq_length: 48, learning_rate: 0.01, "
            "save_steps: 10, logging_steps: 1")
EVALUATE = "max_rows: 4, num_prompts: 1, max_new_tokens: 4, max_seq_length: 160"


def _cli_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
    return env | {"PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
                  "PREFECT_HOME": str(tmp_path / ".prefect"), "TQDM_DISABLE": "1"} | extra


def _servers(tmp_path, env, prefect_port, mlflow_port) -> dict:
    r = subprocess.run([sys.executable, "-m", "shomin.flows.cli", "server", "--detach", "--prefect-port",
                        str(prefect_port), "--mlflow-port", str(mlflow_port)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    return {e["name"]: e["pid"] for e in json.loads((tmp_path / ".prefect" / "shomin-servers.json").read_text())}


def _run_until_sft(tmp_path, env, *args):
    """`shomin run tiny` started; returns (process, run folder) once its sft stage is training."""
    import time
    proc = subprocess.Popen([sys.executable, "-m", "shomin.flows.cli", "run", "tiny", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        for progress in (tmp_path / "runs" / "tiny").glob("*/progress.json"):
            state = json.loads(progress.read_text() or "{}")
            if state.get("stage") == "sft" and state.get("step", 0) >= 1:
                return proc, progress.parent
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    raise AssertionError("sft never started")


def test_servers_dying_mid_run(tmp_path, tiny_model):
    """MLflow dies during sft: the run finishes without it and says so. The Prefect server dies
    during sft: the run fails with one line. Servers back: the same command finishes."""
    from shomin.flows.server import free_port, stop_process_group
    from tests.conftest import tiny_chain
    (tmp_path / "pipelines.yaml").write_text(tiny_chain(tiny_model, sft=SFT_LONG, evaluate=EVALUATE))
    prefect_port, mlflow_port = free_port(), free_port()
    env = _cli_env(tmp_path)
    pids = _servers(tmp_path, env, prefect_port, mlflow_port)
    served = env | {"PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                    "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"}
    try:
        # 1. the MLflow server dies mid-sft: the run finishes, one warning line, the summary says so
        proc, run = _run_until_sft(tmp_path, served)
        stop_process_group(pids["mlflow"], grace=2)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        warnings = [x for x in err.splitlines() if "stopped answering" in x]
        assert len(warnings) == 1 and warnings[0].startswith("shomin: warning: MLflow at http://127.0.0.1:"), err[-3000:]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and "stopped answering" in summary["tracking_lost"]
        assert all(s["status"] == "completed" for s in summary["stages"].values())

        # 2. the Prefect server dies mid-sft (tracking in sqlite now). Prefect 3 reports task states as
        # events, so the stages carry on; only the flow run's end cannot be reported: one warning line
        local = {k: v for k, v in served.items() if k != "MLFLOW_TRACKING_URI"}
        proc, run = _run_until_sft(tmp_path, local, "--refresh")
        stop_process_group(pids["prefect"], grace=2)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        (line,) = [x for x in err.splitlines() if x.startswith("shomin: ") and "Prefect server" in x]
        assert line.startswith(f"shomin: warning: the Prefect server at http://127.0.0.1:{prefect_port}/api stopped"), line
        assert "shomin: completed: " in out   # (Prefect's own log shipper may still complain below it)
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"

        # 3. a run started while it is away: one line, exit 2, before any work
        gone = subprocess.run([sys.executable, "-m", "shomin.flows.cli", "run", "tiny"], cwd=tmp_path, env=local,
                              capture_output=True, text=True, timeout=120)
        assert gone.returncode == 2 and gone.stderr.strip().splitlines() == [
            f"shomin: PREFECT_API_URL: the Prefect server at http://127.0.0.1:{prefect_port}/api does not answer; start "
            "it (`shomin server --detach`), or unset PREFECT_API_URL to run on a throwaway server"], gone.stderr[-2000:]

        # 4. servers back: the same command finishes, every stage from the cache
        subprocess.run([sys.executable, "-m", "shomin.flows.cli", "server", "--stop"], cwd=tmp_path, env=env,
                       capture_output=True, timeout=60)
        pids = _servers(tmp_path, env, prefect_port, mlflow_port)
        again = subprocess.run([sys.executable, "-m", "shomin.flows.cli", "run", "tiny"], cwd=tmp_path,
                               env=served, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "sft         cached" in again.stdout, again.stdout
    finally:
        for pid in pids.values():
            stop_process_group(pid, grace=2)


# ---------------------------------------------------------------- a half-downloaded hub snapshot


def _hub_snapshot(cache: Path, repo: str, model: Path) -> Path:
    """The tiny model laid out as huggingface_hub caches a download of `repo`, in two shards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    commit = "0" * 40
    root = cache / "hub" / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    AutoModelForCausalLM.from_pretrained(model).save_pretrained(snap, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(model).save_pretrained(snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return snap


def test_a_half_downloaded_snapshot_is_not_passed_on(tmp_path, tiny_model):
    """Offline, a cached snapshot missing a shard or holding a cut-short one is refused before the
    run (one line naming it, exit 2, nothing written); whole again, the same command runs."""
    snap = _hub_snapshot(tmp_path / "cache", "shomin-test/tiny", tiny_model)
    shards = sorted(snap.glob("model-*.safetensors"))
    assert len(shards) >= 2
    (tmp_path / "pipelines.yaml").write_text(
        "pipelines:\n  p:\n    model: {source: shomin-test/tiny}\n    stages:\n      env_check:\n      model_init:\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")} | {
        "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "SHOMIN_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "shomin.flows.cli", "run", "p"]
    whole = shards[-1].read_bytes()
    for damage, named in ((lambda f: f.unlink(), f"{shards[-1].name} is missing"),
                          (lambda f: f.write_bytes(whole[: len(whole) // 2]), f"{shards[-1].name} is cut short")):
        damage(shards[-1])
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 2, r.stderr[-2000:]
        (line,) = r.stderr.strip().splitlines()
        assert "shomin-test/tiny" in line and "incomplete" in line and named in line and "HF_HUB_OFFLINE" in line, line
        assert not (tmp_path / "runs").exists()
    shards[-1].write_bytes(whole)
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(next((tmp_path / "runs" / "p").glob("*/summary.json")).read_text())["status"] == "completed"


def test_online_a_half_downloaded_snapshot_is_fetched_again(tmp_path, tiny_model, monkeypatch):
    """With the hub on, the snapshot is downloaded again whole (force_download). The hub cannot be
    reached from here, so huggingface_hub's snapshot_download is stood in for by one that serves
    the cached, damaged snapshot, and a whole one only when asked to download again."""
    import huggingface_hub
    from huggingface_hub import constants
    from shomin.tasks.ground import hub
    from shomin.tasks.ground.settings import ModelSpec
    snap = _hub_snapshot(tmp_path / "cache", "shomin-test/tiny", tiny_model)
    shard = sorted(snap.glob("model-*.safetensors"))[-1]
    whole = shard.read_bytes()
    shard.write_bytes(whole[:100])
    asked = []

    def snapshot_download(repo_id, force_download=False, **kwargs):
        asked.append(force_download)
        if force_download:
            shard.write_bytes(whole)
        return str(snap)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub.download(ModelSpec(source="shomin-test/tiny"), str(tmp_path / "cache")) == snap
    assert asked == [False, True] and shard.read_bytes() == whole


# ---------------------------------------------------------------- a cached stage whose folder was damaged


def test_a_cached_stage_with_a_damaged_folder_is_recomputed(tmp_path, tiny_model):
    """The cache says sft is done, but its adapter was cut short (or its folder deleted): the
    rerun trains it again instead of merging a broken adapter."""
    from shomin.tasks.ground.hub import safetensors_problem
    from tests.conftest import tiny_chain
    sft = "max_steps: 2, batch_size: 4, micro_batch_size: 4, max_seq_length: 48, learning_rate: 0.01, save_steps: 2"
    (tmp_path / "pipelines.yaml").write_text(tiny_chain(tiny_model, sft=sft, evaluate=EVALUATE))
    env = _cli_env(tmp_path)
    cmd = [sys.executable, "-m", "shomin.flows.cli", "run", "tiny"]

    def run_once() -> dict:
        before = set((tmp_path / "runs" / "tiny").glob("*/summary.json"))
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        (new,) = set((tmp_path / "runs" / "tiny").glob("*/summary.json")) - before
        return json.loads(new.read_text())
    first = run_once()
    adapter = Path(first["stages"]["sft"]["artifacts"]["adapter"]) / "adapter_model.safetensors"
    whole = adapter.read_bytes()
    adapter.write_bytes(whole[: len(whole) // 2])
    second = run_once()
    assert second["stages"]["sft"]["status"] == "completed"        # trained again, not passed on
    assert second["stages"]["dataset"]["status"] == "cached"
    again = Path(second["stages"]["sft"]["artifacts"]["adapter"]) / "adapter_model.safetensors"
    assert safetensors_problem(again) is None and again.read_bytes() == whole   # same seed, same adapter
    import shutil
    shutil.rmtree(Path(second["stages"]["merge"]["artifacts"]["merged"]).parent)   # a whole folder deleted
    third = run_once()
    assert third["stages"]["merge"]["status"] == "completed" and third["stages"]["sft"]["status"] == "cached"
