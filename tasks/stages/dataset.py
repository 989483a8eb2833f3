"""Stage dataset: load rows, validate them with pandera, apply the prompt template,
split train/eval by seed, write the templated sets as JSONL. Chat rows are checked
turn by turn and written as role/content messages; preference rows are checked pair
by pair and written as prompt/chosen/rejected (tasks/ground/preferences.py).

Validation runs before any model is loaded (also from `shomin validate`), and
names the file, row and column of every problem it finds, so a bad row costs
seconds. Instruction rows become TRL's prompt/completion pairs, which makes
SFTTrainer put the loss on the response only.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors
from pydantic import Field
from shomin.tasks.ground.contract import Inputs, Stage, StageContext
from shomin.tasks.ground.conversations import read_conversations
from shomin.tasks.ground.errors import DataError
from shomin.tasks.ground.preferences import read_preferences
from shomin.tasks.ground.records import DataResult
from shomin.tasks.ground.rundir import staged_dir, write_json
from shomin.tasks.ground.settings import DatasetSpec, Strict

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DatasetStageSettings(Strict):
    drop_duplicates: bool = Field(True, description="Drop rows whose templated text repeats.")


def _not_blank(s: pd.Series) -> pd.Series:
    return s.astype(str).str.strip().str.len() > 0


def schema_for(spec: DatasetSpec) -> pa.DataFrameSchema:
    text = dict(dtype=str, nullable=False, coerce=False)
    if spec.format == "instruction":
        columns = {
            "instruction": pa.Column(**text, checks=pa.Check(_not_blank, element_wise=False, error="empty or whitespace-only")),
            "input": pa.Column(str, nullable=True, required=False),
            "output": pa.Column(**text, checks=pa.Check(_not_blank, element_wise=False, error="empty or whitespace-only")),
        }
    else:
        columns = {spec.text_column: pa.Column(**text, checks=pa.Check(_not_blank, element_wise=False, error="empty or whitespace-only"))}
    return pa.DataFrameSchema(columns, strict=not spec.allow_extra_columns)


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}: line {n}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {n}: expected a JSON object")
            rows.append(obj)
    return pd.DataFrame(rows)


def is_hub_source(spec: DatasetSpec) -> bool:
    path = Path(spec.source).expanduser()
    return not (path.suffix in LOCAL_SUFFIXES or path.exists() or spec.source.startswith((".", "/", "~")))


def read_rows(spec: DatasetSpec) -> tuple[pd.DataFrame, str]:
    """Rows as a DataFrame plus a label for error messages (the file or hub id)."""
    path = Path(spec.source).expanduser()
    if not is_hub_source(spec):
        if not path.exists():
            raise DataError(f"dataset.source: {spec.source}: file not found")
        if path.suffix not in LOCAL_SUFFIXES:
            raise DataError(f"dataset.source: {spec.source}: expected one of {', '.join(LOCAL_SUFFIXES)}")
        try:
            if path.suffix == ".jsonl":
                df = _read_jsonl(path)
            elif path.suffix == ".json":
                df = pd.read_json(path, dtype=False)
            elif path.suffix == ".csv":
                df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
            else:
                df = pd.read_parquet(path)
        except DataError:
            raise
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
        except Exception as e:
            raise DataError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return df, str(path)
    return _read_hub(spec), spec.source


def _read_hub(spec: DatasetSpec) -> pd.DataFrame:
    from datasets import load_dataset
    try:
        ds = load_dataset(spec.source, split=spec.split)
    except Exception as e:
        from huggingface_hub import constants
        if constants.is_offline_mode():
            raise DataError(f"dataset.source: '{spec.source}' split '{spec.split}' is not in the local cache and "
                            "HF_HUB_OFFLINE=1 keeps the hub off; load it once with network access (unset "
                            "HF_HUB_OFFLINE), or point dataset.source at a local .jsonl/.csv/.parquet") from None
        raise DataError(f"dataset.source: cannot load '{spec.source}' split '{spec.split}' "
                        f"({type(e).__name__}); check the id and network, or unset HF_HUB_OFFLINE") from None
    return ds.to_pandas()


def validate_rows(df: pd.DataFrame, spec: DatasetSpec, label: str) -> pd.DataFrame | list[list[dict]] | list[dict]:
    """pandera, lazily: every failing row/column is collected, the first few named. Chat rows
    are lists of messages, checked message by message (tasks/ground/conversations.py);
    preference rows pair by pair (tasks/ground/preferences.py)."""
    if df.empty:
        raise DataError(f"{label}: dataset is empty")
    if spec.format == "chat":
        return read_conversations(df, spec.system, spec.allow_extra_columns, label)
    if spec.format == "preference":
        return read_preferences(df, spec.allow_extra_columns, label)
    if spec.format == "instruction" and "input" not in df.columns:
        df = df.assign(input="")
    try:
        schema_for(spec).validate(df, lazy=True)
    except SchemaErrors as e:
        raise DataError(f"{label}: {_describe(e.failure_cases)}") from None
    df = df.copy()
    if spec.format == "instruction":
        df["input"] = df["input"].fillna("").astype(str)
    return df


def _describe(cases: pd.DataFrame) -> str:
    parts = []
    for _, c in cases.head(3).iterrows():
        col = c.get("column")
        idx = c.get("index")
        check = str(c.get("check"))
        if check == "column_in_schema":
            parts.append(f"unexpected column '{c.get('failure_case')}'")
        elif check == "column_in_dataframe":
            parts.append(f"missing column '{c.get('failure_case')}'")
        elif idx is not None and not pd.isna(idx):
            what = "empty or whitespace-only" if "empty" in check else check
            if str(c.get("failure_case")) in ("None", "nan") and "empty" not in check:
                what = "missing value"
            parts.append(f"row {int(idx) + 1}: column '{col}': {what}")
        else:
            parts.append(f"column '{col}': {check}")
    more = len(cases) - min(3, len(cases))
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def apply_template(df: pd.DataFrame | list[list[dict]] | list[dict], spec: DatasetSpec) -> list[dict]:
    """Rows as the SFT stage reads them. Chat rows stay messages: only the model's own
    tokenizer can render them (its chat template), and the dataset stage loads no model.
    Preference rows are already in the one shape reward_model and dpo read."""
    if spec.format == "preference":
        return df
    if spec.format == "chat":
        return [{"messages": m} for m in df]
    if spec.format == "text":
        return [{"text": t} for t in df[spec.text_column].astype(str)]
    t = spec.template
    rows = []
    for ins, inp, out in zip(df["instruction"], df["input"], df["output"]):
        prompt = (t.prompt if inp.strip() else t.prompt_no_input).format(instruction=ins, input=inp)
        rows.append({"prompt": prompt, "completion": t.response.format(output=out)})
    return rows


def split(rows: list[dict], spec: DatasetSpec, seed: int, label: str) -> tuple[list[dict], list[dict]]:
    order = np.random.default_rng(seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    if spec.max_rows:
        rows = rows[: spec.max_rows]
    n_eval = max(1, round(len(rows) * spec.eval_fraction))
    if spec.eval_max_rows:
        n_eval = min(n_eval, spec.eval_max_rows)
    if len(rows) - n_eval < 1:
        raise DataError(f"{label}: {len(rows)} rows leave nothing to train on after the eval split "
                        f"(dataset.eval_fraction={spec.eval_fraction})")
    return rows[n_eval:], rows[:n_eval]


def prepare(spec: DatasetSpec, seed: int, settings: DatasetStageSettings | None = None):
    """Everything but writing: load, validate, template, dedupe, split. `validate` calls this."""
    df, label = read_rows(spec)
    df = validate_rows(df, spec, label)
    rows = apply_template(df, spec)
    if settings is None or settings.drop_duplicates:
        seen, unique = set(), []
        for r in rows:
            key = json.dumps(r, sort_keys=True, ensure_ascii=False)
            if key not in seen:
                seen.add(key)
                unique.append(r)
        rows = unique
    return split(rows, spec, seed, label)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def run(ctx: StageContext, inputs: Inputs) -> DataResult:
    t0, spec, seed = time.time(), ctx.dataset, ctx.seed
    train, evals = prepare(spec, seed, ctx.settings)
    with staged_dir(ctx.out_dir) as tmp:
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "eval.jsonl", evals)
        write_json(tmp / "dataset.json", {"source": spec.source, "format": spec.format,
                                          "n_train": len(train), "n_eval": len(evals), "seed": seed})
    out = Path(ctx.out_dir)
    return DataResult(stage="dataset", output_dir=str(out), train_path=str(out / "train.jsonl"),
                      eval_path=str(out / "eval.jsonl"), format=spec.format, n_train=len(train),
                      n_eval=len(evals), metrics={"n_train": len(train), "n_eval": len(evals)},
                      artifacts={"train": str(out / "train.jsonl"), "eval": str(out / "eval.jsonl")},
                      seconds=time.time() - t0)


def check(pipeline, settings: DatasetStageSettings, before_run: bool) -> None:
    """Every row is read and validated before a run, and by `shomin validate` (offline, a hub
    set only before a run: it is read from the cache)."""
    from shomin.tasks.ground.hub import hub_offline
    if before_run and hub_offline() or not is_hub_source(pipeline.dataset):
        prepare(pipeline.dataset, pipeline.seed, settings)


STAGE = Stage("dataset", DatasetStageSettings, run, check=check, identity=("dataset", "seed"), retries=2,
              needs_dataset_spec=True,
              help="Read, validate (pandera), template and split the dataset into train/eval JSONL.")
