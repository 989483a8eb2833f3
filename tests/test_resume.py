"""SIGKILL in the middle of SFT, then the same command again: the rerun resumes from the
last complete checkpoint, earlier stages come from the cache, and no half-written
stage folder is ever left where a later stage could read it."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

# A step takes ~0.3-0.5 s on a busy CPU; 16 steps with a checkpoint every 2 leave a wide window to kill in.
PIPELINE = """
pipelines:
  tiny:
    model: {{source: {model}}}
    dataset: {{source: {data}}}
    seed: 11
    stages:
      model_init:
      dataset:
      sft: {{max_steps: 16, batch_size: 4, micro_batch_size: 4, max_seq_length: 64, learning_rate: 0.001,
             save_steps: 2, logging_steps: 1}}
"""


def _env():
    return os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _complete_checkpoints(workdir):
    return sorted(workdir.glob("runs/tiny/.checkpoints/*/checkpoint-*/trainer_state.json"))


def test_sigkill_during_sft_then_rerun_resumes(tmp_path, tiny_model):
    (tmp_path / "pipelines.yaml").write_text(textwrap.dedent(PIPELINE.format(
        model=tiny_model, data=ROOT / "data" / "dolly-ja-sample.jsonl")), encoding="utf-8")
    cmd = [sys.executable, "-m", "shomin.flows.cli", "run", "tiny"]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)   # its own process group: the kill takes Prefect's server too
    try:
        deadline = time.time() + 150
        while not _complete_checkpoints(tmp_path):
            assert first.poll() is None, f"first run ended (exit {first.returncode}) before any checkpoint:\n" \
                                         + (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 150 s"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)   # the moment the first checkpoint is complete
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        log.close()
    assert first.returncode == -signal.SIGKILL
    killed_step = max(int(p.parent.name.split("-")[1]) for p in _complete_checkpoints(tmp_path))
    assert killed_step < 16, "the first run finished before it could be killed"

    (run1,) = [p.parent for p in (tmp_path / "runs" / "tiny").glob("*/summary.json")]
    assert not (run1 / "sft").exists()                      # atomic: no stage folder for an unfinished stage
    assert not list(run1.glob(".sft.partial-*"))
    killed = json.loads((run1 / "summary.json").read_text())
    statuses = {k: v["status"] for k, v in killed["stages"].items()}
    assert statuses.pop("sft") == "running" and set(statuses) == {"model_init", "dataset"}   # nothing past dataset
    assert set(statuses.values()) <= {"completed", "cached"}   # (cached when another test ran them first)
    # the next look at the folder marks the killed run, and says where it stopped
    listed = subprocess.run([sys.executable, "-m", "shomin.flows.cli", "runs", "--json", "--no-mlflow"], cwd=tmp_path,
                            env=_env(), capture_output=True, text=True, timeout=120)
    (row,) = [r for r in json.loads(listed.stdout) if r["run_id"] == run1.name]
    assert row["status"] == "interrupted" and row["interrupted_stage"] == "sft" and row["interrupted_at"]
    assert json.loads((run1 / "summary.json").read_text())["status"] == "interrupted"   # written back

    second = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-3000:]
    (run2,) = [p.parent for p in (tmp_path / "runs" / "tiny").glob("*/summary.json") if p.parent != run1]
    summary = json.loads((run2 / "summary.json").read_text())
    assert summary["status"] == "completed"
    stages = summary["stages"]
    assert stages["model_init"]["status"] == "cached" and stages["dataset"]["status"] == "cached"
    assert stages["sft"]["status"] == "completed"
    assert stages["sft"]["resumed_from_step"] >= 2 and stages["sft"]["resumed_from_step"] <= killed_step
    assert stages["sft"]["metrics"]["steps"] == 16
    history = json.loads((run2 / "sft" / "log_history.json").read_text())
    assert min(e["step"] for e in history if "loss" in e) == 1   # the log of the killed steps came back too
    assert not list((tmp_path / "runs" / "tiny" / ".checkpoints").glob("*/checkpoint-*"))  # cleaned after success

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run2 / "sft" / "adapter")
    with torch.no_grad():
        logits = model(torch.randint(3, 200, (1, 8))).logits
    assert torch.isfinite(logits).all()


def test_last_checkpoint_skips_one_cut_off_mid_save(tmp_path):
    """A kill during a save leaves the newest checkpoint without trainer_state.json (written last)."""
    from shomin.tasks.stages.sft import last_checkpoint
    assert last_checkpoint(tmp_path / "none") == (None, None)
    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (d / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / "checkpoint-8" / "trainer_state.json").write_text('{"half')  # cut off while writing
    assert last_checkpoint(tmp_path) == (str(tmp_path / "checkpoint-4"), 4)


def test_a_full_disk_during_a_checkpoint_save_leaves_no_half_checkpoint(tmp_path):
    """ENOSPC while saving: the store's temp folder goes, and a Trainer checkpoint cut off
    mid-save is pruned, so only complete checkpoints stay for the rerun."""
    from shomin.tasks.ground import checkpoints as store
    _complete = store.trainer_complete

    def fills_the_disk(tmp):
        (tmp / "adapter_model.safetensors").write_bytes(b"x" * 10)
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        store.save(tmp_path, "checkpoint", 3, fills_the_disk, _complete)
    assert list(tmp_path.iterdir()) == []
    for step, whole in ((2, True), (4, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x")
        if whole:
            (d / "trainer_state.json").write_text("{}")
    assert store.prune_incomplete(tmp_path, "checkpoint", _complete) == ["checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="flock is POSIX")
def test_checkpoint_lock_gives_a_concurrent_run_its_own_folder(tmp_path):
    from shomin.tasks.ground.checkpoints import claim
    root = tmp_path / ".checkpoints" / "key"
    with pytest.raises(KeyboardInterrupt):
        with claim(root) as a:
            # a second process of the same inputs while the first trains
            code = ("import sys; from pathlib import Path; from shomin.tasks.ground.checkpoints import claim\n"
                    f"with claim(Path({str(root)!r})) as c: print(c.folder, c.owned)")
            r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
            a.folder.mkdir(parents=True)
            raise KeyboardInterrupt   # killed: its checkpoints stay for the rerun
    assert (a.folder, a.owned) == (root, True) and root.is_dir()
    other, owned = r.stdout.split()
    assert owned == "False" and other != str(root) and other.startswith(str(root) + ".concurrent-")
    assert not Path(other).exists()       # the concurrent run's private folder is gone
    with claim(root) as again:   # released: the rerun gets (and resumes from) the folder
        assert (again.folder, again.owned) == (root, True)
    assert not root.exists()     # success: the checkpoints have done their job
