"""Run folders and MLflow records: atomic stage folders, redacted secrets, truncated params."""
import json

import pytest
from shomin.tasks.ground.records import StageResult
from shomin.tasks.ground.rundir import RunDir, staged_dir
from shomin.tasks.ground.settings import Tracking
from shomin.tasks.ground.tracking import MAX_PARAM, Tracker, redact


def test_staged_dir_appears_only_complete(tmp_path):
    target = tmp_path / "sft"
    with pytest.raises(RuntimeError):
        with staged_dir(target) as tmp:
            (tmp / "adapter.safetensors").write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with staged_dir(target) as tmp:
        (tmp / "adapter.safetensors").write_bytes(b"whole")
    assert (target / "adapter.safetensors").read_bytes() == b"whole"


def test_concurrent_runs_get_their_own_folders(tmp_path):
    a, b = RunDir(tmp_path, "p"), RunDir(tmp_path, "p")
    assert a.path != b.path and a.run_id != b.run_id
    a.record_stage("sft", "completed", StageResult(stage="sft", output_dir=str(a.path / "sft"), metrics={"loss": 1.0}))
    assert json.loads((a.path / "summary.json").read_text())["stages"]["sft"]["metrics"] == {"loss": 1.0}
    assert json.loads((b.path / "summary.json").read_text())["stages"] == {}


def test_secrets_never_reach_mlflow(tmp_path, monkeypatch):
    token = "hf_" + "a1B2c3D4e5F6g7H8i9J0kLmNoPqRsT"
    monkeypatch.setenv("HF_TOKEN", token)
    assert redact("hub_token", "anything") == "***"
    assert redact("model.source", token) == "***"
    assert token not in redact("note", f"using {token} today")
    tracker = Tracker(Tracking(uri=f"sqlite:///{tmp_path}/m.db"), "exp", tmp_path)
    rid = tracker.start("p/1", {"model": {"source": "org/m", "api_key": "sk-" + "x" * 30},
                                "description": f"token {token}", "long": "y" * (MAX_PARAM + 500)}, {})
    params = tracker.client.get_run(rid).data.params
    assert params["model.api_key"] == "***" and token not in params["description"]
    assert len(params["long"]) == MAX_PARAM                    # cut to MLflow's limit, run not crashed
    assert all(token not in v for v in params.values())


def test_a_run_whose_process_is_gone_is_marked_interrupted(tmp_path):
    """settle(): `running` with a dead process -> `interrupted` (when, which stage), written back;
    a live process, or one on another host, is left alone."""
    import json
    import subprocess
    import sys

    from shomin.tasks.ground.rundir import RunDir, settle, this_process
    run = RunDir(tmp_path / "runs", "p", "r1")
    run.record_stage("dataset", "completed")
    run.record_stage("sft", "running")
    path = run.path / "summary.json"
    assert settle(path)["status"] == "running"                 # this very process: alive
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.summary["process"] = {**this_process(), "pid": dead.pid, "start": None}
    run.save()
    settled = settle(path)
    assert settled["status"] == "interrupted" and settled["interrupted_stage"] == "sft"
    assert settled["stages"]["sft"]["status"] == "interrupted" and settled["stages"]["dataset"]["status"] == "completed"
    assert "in stage sft" in settled["error"] and settled["interrupted_at"]
    assert json.loads(path.read_text())["status"] == "interrupted"
    other = RunDir(tmp_path / "runs", "p", "r2")
    other.summary["process"] = {"host": "another-machine", "pid": dead.pid, "start": None}
    other.save()
    assert settle(other.path / "summary.json")["status"] == "running"   # cannot tell from here: unchanged


def test_a_stage_folder_knows_when_it_lost_or_truncated_a_file(tmp_path):
    from shomin.tasks.ground.rundir import MANIFEST, intact, staged_dir
    with staged_dir(tmp_path / "stage") as tmp:
        (tmp / "model.safetensors").write_bytes(b"x" * 100)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.json").write_text("{}")
    folder = tmp_path / "stage"
    assert (folder / MANIFEST).is_file() and intact(folder)
    (folder / "model.safetensors").write_bytes(b"x" * 60)       # truncated
    assert not intact(folder)
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    (folder / "sub" / "a.json").unlink()                          # a file removed
    assert not intact(folder)
    assert not intact(tmp_path / "gone")
