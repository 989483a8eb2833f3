"""`shomin compare`: two runs side by side with their standard errors; which differences are noise."""
from __future__ import annotations

import json

from shomin.flows import cli


def run_folder(root, pipeline, run_id, metrics):
    folder = root / "runs" / pipeline / run_id
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "pipeline": pipeline, "run_id": run_id, "status": "completed",
        "stages": {"ppo": {"metrics": {"reward_final": 0.4}}, "evaluate": {"metrics": metrics}}}))
    return folder


def test_compare_flags_what_is_within_noise(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = run_folder(tmp_path, "p", "r1", {"reward_gain": 0.30, "reward_gain_se": 0.03, "kl_ppo": 5.0, "kl_ppo_se": 0.2,
                                         "loss_after": 2.0})
    run_folder(tmp_path, "p", "r2", {"reward_gain": 0.34, "reward_gain_se": 0.03, "kl_ppo": 7.0, "kl_ppo_se": 0.2,
                                     "loss_after": 1.9})
    assert cli.main(["compare", str(a), "p/r2"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert "0.3 ± 0.03" in lines["reward_gain"] and "within noise" in lines["reward_gain"]   # 0.04 < 2 x 0.042
    assert "differs" in lines["kl_ppo"]                                                       # 2.0 > 2 x 0.28
    assert "no error bar" in lines["loss_after"] and "reward_final" in lines
    assert cli.main(["compare", str(a), "p/nope"]) == 2       # a run that is not there: one line, exit 2
    assert "p/nope: no run there" in capsys.readouterr().err
    assert cli.main(["compare", str(a), "p/r2", "--json"]) == 0
    rows = {r["metric"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["reward_gain"]["within_noise"] is True and rows["kl_ppo"]["within_noise"] is False
