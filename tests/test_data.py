"""Dataset stage: pandera validation naming rows, templating, a seeded split, atomic output."""
import json

import pytest
from shomin.tasks.ground.rundir import read_jsonl
from shomin.tasks.ground.settings import DatasetSpec, ModelSpec
from shomin.tasks.stages import dataset as data
from shomin.tasks.stages.dataset import DatasetStageSettings

from tests.conftest import ROOT
from tests.helpers import run_stage, stage_context  # noqa: F401


def jsonl(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = [{"instruction": f"質問{i}", "input": "" if i % 2 else f"文{i}", "output": f"答え{i}"} for i in range(20)]


def test_template_with_and_without_input(tmp_path):
    spec = DatasetSpec(source=str(jsonl(tmp_path, GOOD[:2])))
    train, evals = data.prepare(spec.model_copy(update={"eval_fraction": 0.5}), seed=0)
    rows = {r["prompt"]: r["completion"] for r in train + evals}
    assert rows["指示: 質問0\n入力: 文0\n"] == "応答: 答え0"
    assert rows["指示: 質問1\n"] == "応答: 答え1"   # the 入力 part left out when input is empty


def test_split_is_deterministic_by_seed(tmp_path):
    spec = DatasetSpec(source=str(jsonl(tmp_path, GOOD)), eval_fraction=0.25)
    a, b, c = (data.prepare(spec, seed=s) for s in (1, 1, 2))
    assert a == b and a != c
    assert len(a[1]) == 5 and len(a[0]) == 15
    assert not {r["prompt"] for r in a[0]} & {r["prompt"] for r in a[1]}


@pytest.mark.parametrize("rows, expected", [
    ([{"instruction": "a", "input": "", "output": "b"}, {"instruction": " ", "input": "", "output": "b"}],
     "row 2: column 'instruction': empty or whitespace-only"),
    ([{"instruction": "a", "input": "", "output": ""}], "row 1: column 'output': empty or whitespace-only"),
    ([{"instruction": "a", "input": ""}], "missing column 'output'"),
    ([{"instruction": "a", "input": "", "output": "b", "category": "qa"}], "unexpected column 'category'"),
    ([{"instruction": "a", "input": "", "output": None}], "row 1: column 'output'"),
])
def test_bad_rows_are_named(tmp_path, rows, expected):
    spec = DatasetSpec(source=str(jsonl(tmp_path, rows)))
    with pytest.raises(data.DataError) as e:
        data.prepare(spec, seed=0)
    assert expected in str(e.value) and "rows.jsonl" in str(e.value)


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "a",\n', encoding="utf-8")
    with pytest.raises(data.DataError, match=r"bad.jsonl: line 2: malformed JSON"):
        data.prepare(DatasetSpec(source=str(path)), seed=0)


def test_empty_missing_and_too_small(tmp_path):
    with pytest.raises(data.DataError, match="file not found"):
        data.prepare(DatasetSpec(source=str(tmp_path / "none.jsonl")), seed=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(data.DataError, match="dataset is empty"):
        data.prepare(DatasetSpec(source=str(empty)), seed=0)
    one = jsonl(tmp_path, GOOD[:1], "one.jsonl")
    with pytest.raises(data.DataError, match="nothing to train on"):
        data.prepare(DatasetSpec(source=str(one)), seed=0)


def test_text_format_and_extra_columns_allowed(tmp_path):
    spec = DatasetSpec(source=str(ROOT / "data" / "movie-reviews.jsonl"), format="text", allow_extra_columns=True)
    train, evals = data.prepare(spec, seed=0)
    assert len(train) + len(evals) == 240 and set(train[0]) == {"text"}


def test_stage_writes_folder_atomically(tmp_path):
    spec = DatasetSpec(source=str(ROOT / "data" / "dolly-ja-sample.jsonl"))
    res = run_stage("dataset", DatasetStageSettings(), tmp_path / "dataset", model=ModelSpec(source="-"), dataset=spec)
    assert res.n_train + res.n_eval == 80
    assert len(read_jsonl(res.train_path)) == res.n_train
    bad = DatasetSpec(source=str(jsonl(tmp_path, [{"instruction": "a", "input": "", "output": ""}])))
    with pytest.raises(data.DataError):
        run_stage("dataset", DatasetStageSettings(), tmp_path / "dataset2", model=ModelSpec(source="-"), dataset=bad)
    assert not (tmp_path / "dataset2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dataset2")]
