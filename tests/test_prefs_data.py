"""Preference data: the shipped pair files pass the dataset stage with their row counts, both
of TRL's row shapes come out in one shape, and every bad row is refused by file, row and
column before any model loads (also through `shomin validate`)."""
import json
import os
import subprocess
import sys

import pytest

from shomin.tasks.ground.errors import DataError
from shomin.tasks.ground.settings import DatasetSpec
from shomin.tasks.stages.dataset import DatasetStageSettings, prepare
from tests.conftest import ROOT

KEEP_REPEATS = DatasetStageSettings(drop_duplicates=False)
SHIPPED = {"prefs-reviews.jsonl": 120, "prefs-ja.jsonl": 60}


def write(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def spec(path, **kw):
    return DatasetSpec(source=path, format="preference", **kw)


def msg(role, content):
    return {"role": role, "content": content}


def pair(i):
    return {"prompt": f"Question {i}?", "chosen": f"A good answer {i}.", "rejected": f"A poor answer {i}."}


@pytest.mark.parametrize("name, n_rows", list(SHIPPED.items()))
def test_shipped_files_pass_with_their_row_counts(name, n_rows):
    train, evals = prepare(spec(str(ROOT / "data" / name)), seed=0)   # duplicates dropped: none are
    assert len(train) + len(evals) == n_rows and len(evals) == round(n_rows * 0.1)
    for row in train + evals:
        assert list(row) == ["prompt", "chosen", "rejected"]
        assert all(isinstance(v, str) and v.strip() for v in row.values())
    assert len({r["prompt"] for r in train + evals}) == n_rows


def test_review_pairs_read_as_vader_expects():
    """VADER judges the trained reward model on this data: it must agree with every label."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    score = SentimentIntensityAnalyzer().polarity_scores
    with open(ROOT / "data" / "prefs-reviews.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert all(3 <= len(r["prompt"].split()) <= 8 for r in rows)
    assert all(score(r["chosen"])["compound"] > 0 for r in rows)
    assert all(score(r["rejected"])["compound"] < 0 for r in rows)


def test_implicit_prompt_is_the_shared_start_of_the_conversations(tmp_path):
    system, ask = msg("system", "Answer briefly."), msg("user", "How long to boil an egg?")
    history = [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "半熟にするには？")]
    rows = [{"chosen": [system, ask, {**msg("assistant", "About 7 minutes."), "name": "bot"}],
             "rejected": [system, ask, msg("assistant", "Eggs are round.")]},
            {"chosen": history + [msg("assistant", "6分ほどです。")],
             "rejected": history + [msg("assistant", "知りません。")]}]
    train, evals = prepare(spec(write(tmp_path, rows), eval_fraction=0.5), seed=0, settings=KEEP_REPEATS)
    by_prompt = {len(r["prompt"]): r for r in train + evals}
    assert by_prompt[2] == {"prompt": [system, ask], "chosen": [msg("assistant", "About 7 minutes.")],
                            "rejected": [msg("assistant", "Eggs are round.")]}
    assert by_prompt[3] == {"prompt": history, "chosen": [msg("assistant", "6分ほどです。")],
                            "rejected": [msg("assistant", "知りません。")]}


def test_explicit_prompt_and_parquet_arrays(tmp_path):
    """An explicit message-list prompt passes as it is; parquet hands lists back as numpy arrays."""
    import pandas as pd
    rows = [{"prompt": [msg("user", f"Q{i}")], "chosen": [msg("assistant", f"Yes {i}")],
             "rejected": [msg("assistant", f"No {i}")]} for i in range(4)]
    path = tmp_path / "rows.parquet"
    pd.DataFrame(rows).to_parquet(path)
    train, evals = prepare(spec(str(path)), seed=0)
    assert sorted(train + evals, key=lambda r: r["prompt"][0]["content"]) == rows
    assert json.loads(json.dumps(train)) == train   # what the stage writes as JSONL


def test_extra_columns_only_when_allowed(tmp_path):
    path = write(tmp_path, [{**pair(i), "id": i} for i in range(3)])
    with pytest.raises(DataError, match=r"rows.jsonl: unexpected column 'id' .*allow_extra_columns"):
        prepare(spec(path), seed=0)
    train, evals = prepare(spec(path, allow_extra_columns=True), seed=0)
    assert all("id" not in r for r in train + evals)


CONVERSATION = {"chosen": [msg("user", "Hi"), msg("assistant", "Hello!")],
                "rejected": [msg("user", "Hi"), msg("assistant", "Go away.")]}
BAD = {
    "missing column": ([{"prompt": "a", "chosen": "b"}], "missing column 'rejected'"),
    "missing prompt": ([{"chosen": "b", "rejected": "c"}], "missing column 'prompt'"),
    "missing value": ([pair(1), {"prompt": "a", "chosen": "b"}], "row 2: column 'rejected': missing value"),
    "empty": ([pair(i) for i in range(4)] + [{**pair(5), "rejected": "  \n"}],
              "row 5: column 'rejected': empty or whitespace-only"),
    "not a string": ([pair(1), {**pair(2), "chosen": 3}], "row 2: column 'chosen': expected a string, got int"),
    "string prompt, list answers": ([{**CONVERSATION, "prompt": "Hi"}], "row 1: column 'prompt': expected a list"),
    "one side a list": ([{**CONVERSATION, "rejected": "Go away."}], "row 1: column 'rejected': expected a list"),
    "not messages": ([{**CONVERSATION, "chosen": ["Hello!"]}], "row 1: column 'chosen': expected a list of role/content"),
    "unknown role": ([{**CONVERSATION, "chosen": [msg("user", "Hi"), msg("bot", "Hello!")]}],
                     "row 1: column 'chosen': message 2: unknown role 'bot'"),
    "empty message": ([{**CONVERSATION, "rejected": [msg("user", "Hi"), msg("assistant", " ")]}],
                      "row 1: column 'rejected': message 2: empty or whitespace-only content"),
    "same answer": ([pair(1), pair(2), {**pair(3), "chosen": " Same answer.\n", "rejected": "Same answer."}],
                    "row 3: chosen and rejected are the same answer"),
    "same answer, messages": ([{**CONVERSATION, "rejected": CONVERSATION["chosen"]}],
                              "row 1: chosen and rejected are the same answer"),
    "no shared prompt": ([{**CONVERSATION, "rejected": [msg("user", "Yo"), msg("assistant", "Go away.")]}],
                         "row 1: chosen and rejected differ at message 1"),
    "prompt ends with assistant": ([{"prompt": [msg("user", "Hi"), msg("assistant", "Hello")],
                                     "chosen": [msg("assistant", "Yes")], "rejected": [msg("assistant", "No")]}],
                                   "row 1: column 'prompt': must end with a user turn"),
    "two answers after a prompt": ([{"prompt": [msg("user", "Hi")], "chosen": [msg("assistant", "A"), msg("user", "B")],
                                     "rejected": [msg("assistant", "No")]}],
                                   "row 1: column 'chosen': expected one assistant message after the prompt"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_rows_are_named_by_file_row_and_column(case, tmp_path):
    rows, expected = BAD[case]
    path = write(tmp_path, rows, "x.jsonl")
    with pytest.raises(DataError) as e:
        prepare(spec(path), seed=0, settings=KEEP_REPEATS)
    assert str(e.value).startswith(f"{path}: ") and expected in str(e.value) and "\n" not in str(e.value)


def test_many_bad_rows_name_the_first_few_in_one_line(tmp_path):
    rows = [{**pair(i), "rejected": pair(i)["chosen"]} for i in range(6)]
    with pytest.raises(DataError, match=r"row 1: .*; row 2: .*; row 3: .* \(\+3 more\)$"):
        prepare(spec(write(tmp_path, rows)), seed=0)


@pytest.mark.e2e
def test_validate_refuses_a_same_answer_row_in_one_line(tmp_path):
    data = write(tmp_path, [pair(1), {**pair(2), "rejected": pair(2)["chosen"]}, pair(3)], "prefs.jsonl")
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(f"pipelines:\n  p:\n    model: {{source: 'embedded:smollm2-135m-instruct'}}\n"
                   f"    dataset: {{source: '{data}', format: preference}}\n    stages:\n      dataset:\n", encoding="utf-8")
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "shomin.flows.cli", "validate", str(cfg)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{data}: row 2: chosen and rejected are the same answer" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()
