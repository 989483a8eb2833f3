"""What a finished run shows in the Prefect UI and in MLflow, beyond summary.json.

Prefect (artifacts on the flow run, keyed per pipeline so the Artifacts page
keeps their history):
  <pipeline>-stages       table: stage, status, seconds, key metrics
  <pipeline>-evaluation   table: metric, before, after (loss, perplexity, reward, KL)
  <pipeline>-generations  markdown: the held-out prompts answered before and after, side by side
  <pipeline>-ppo          markdown: reward and KL per PPO step (sparklines, plot, table)
  <pipeline>-mlflow       link: the MLflow parent run

MLflow (on the stage runs found under the parent run):
  plots/<stage>_curves.png  matplotlib plots of the stage's curves (loss, eval loss,
                            learning rate, grad norm; reward, KL, KL coefficient, entropy)
  eval_table.json           the evaluation table as an MLflow table (parent and evaluate runs)
  generations.json          answers before/after as an MLflow table
  tags                      pipeline, stage, seed, git commit (mlflow.source.git.commit), prefect flow run
  model version             with `tracking.register: true`, the PPO adapter (RLHF pipelines)
                            or the merged model, as a version of the registered model <pipeline>

Everything here is best effort: `publish_artifacts` never raises, a run's
status is never decided by whether its pictures could be drawn.
"""
# Over ~300 lines: everything a finished run shows people (Prefect artifacts, MLflow plots,
# tables and model versions) in one place, each part a short function.
from __future__ import annotations

import base64
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from shomin.tasks.ground.rundir import markdown_cell

log = logging.getLogger("shomin.artifacts")

SFT_CURVES = ("loss", "eval_loss", "learning_rate", "grad_norm")
PPO_CURVES = ("reward_mean", "kl", "kl_coef", "entropy")
SPARK = "▁▂▃▄▅▆▇█"
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"


# ---------------------------------------------------------------- reading a run


def artifact_key(pipeline: str, what: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9-]+", "-", f"{pipeline}-{what}".lower()).strip("-")
    return re.sub(r"-{2,}", "-", slug)


def _artifacts(results: dict, summary: dict, stage: str) -> dict[str, str]:
    res = results.get(stage) if results else None
    if res is not None and getattr(res, "artifacts", None):
        return dict(res.artifacts)
    return dict((summary.get("stages", {}).get(stage) or {}).get("artifacts") or {})


def _read_json(path: str | None) -> Any:
    if not path or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def eval_report(results: dict, summary: dict) -> dict | None:
    return _read_json(_artifacts(results, summary, "evaluate").get("eval_json"))


def curve_log(results: dict, summary: dict, stage: str) -> list[dict]:
    arts = _artifacts(results, summary, stage)
    entries = _read_json(arts.get("log_history") or arts.get("ppo_log"))
    return [e for e in entries or [] if isinstance(e, dict)]


def eval_rows(report: dict) -> list[dict]:
    """metric | before | after, the numbers people compare; with `*_se` (standard errors) and the
    paired `change` where evaluate measured them."""
    rows = []
    for name in ("loss", "perplexity"):
        if f"{name}_before" in report or f"{name}_after" in report:
            rows.append(_with_se({"metric": name, "before": _num(report.get(f"{name}_before")),
                                  "after": _num(report.get(f"{name}_after"))}, report,
                                 f"{name}_before", f"{name}_after", f"{name}_change"))
    if "reward_sft" in report or "reward_ppo" in report:
        rows.append(_with_se({"metric": "reward", "before": _num(report.get("reward_sft")),
                              "after": _num(report.get("reward_ppo"))}, report, "reward_sft", "reward_ppo", "reward_gain"))
    if "kl_ppo" in report:
        rows.append(_with_se({"metric": "kl_to_reference", "before": 0.0, "after": _num(report.get("kl_ppo"))},
                             report, None, "kl_ppo", None))
    if "n_eval_rows" in report:
        rows.append({"metric": "eval_rows", "before": report["n_eval_rows"], "after": report["n_eval_rows"]})
    return rows


def _with_se(row: dict, report: dict, before: str | None, after: str | None, change: str | None) -> dict:
    for key, name in (("before_se", before), ("after_se", after), ("change_se", change)):
        if name and f"{name}_se" in report:
            row[key] = _num(report[f"{name}_se"])
    if change and change in report:
        row["change"] = _num(report[change])
    return row


def _num(v: Any) -> float | None:
    return round(float(v), 4) if isinstance(v, (int, float)) else None


def sparkline(values: list[float]) -> str:
    vals = [v for v in values if isinstance(v, (int, float)) and v == v]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in vals)


# ---------------------------------------------------------------- plots (matplotlib, no pyplot state)


def plot_curves(entries: list[dict], keys: tuple[str, ...], title: str, path: str | Path) -> Path | None:
    """One PNG with a panel per curve found in a stage's log; None when there is nothing to draw."""
    series = {}
    for k in keys:
        pts = [(int(e.get("step", i)), float(e[k])) for i, e in enumerate(entries)
               if isinstance(e.get(k), (int, float)) and e[k] == e[k]]
        if pts:
            series[k] = pts
    if not series:
        return None
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.2 * len(series), 3.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    for ax, (k, pts) in zip(axes, series.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        if k == "reward_mean":
            std = [float(e.get("reward_std", 0.0)) for e in entries if isinstance(e.get(k), (int, float))]
            if len(std) == len(ys):
                ax.fill_between(xs, [y - s for y, s in zip(ys, std)], [y + s for y, s in zip(ys, std)], alpha=0.2)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ---------------------------------------------------------------- Prefect


# Long on purpose (~70 lines): one block per artifact of the flow-run page, in page order,
# so the page can be read top-down here.
def prefect_artifacts(summary: dict, results: dict, mlflow_url: str | None) -> list[str]:
    """Create the flow run's artifacts; returns their keys."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
    pipeline, run_id = summary.get("pipeline", "pipeline"), summary.get("run_id", "")
    keys: list[str] = []

    stage_rows = []
    for stage, entry in (summary.get("stages") or {}).items():
        metrics = entry.get("metrics") or {}
        shown = ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:4] if isinstance(v, (int, float)))
        stage_rows.append({"stage": stage, "status": entry.get("status"), "seconds": _fmt(entry.get("seconds")),
                           "metrics": shown or "—"})
    if stage_rows:
        key = artifact_key(pipeline, "stages")
        create_table_artifact(stage_rows, key=key, description=f"**{pipeline}** run `{run_id}`: stages")
        keys.append(key)

    report = eval_report(results, summary)
    if report:
        key = artifact_key(pipeline, "evaluation")
        # numbers as text: the Prefect UI's table shows floats rounded to integers
        shown = [{"metric": r["metric"], "before": _pm(r["before"], r.get("before_se")),
                  "after": _pm(r["after"], r.get("after_se")),
                  "change": _pm(r["change"], r.get("change_se")) if "change" in r else _change(r["before"], r["after"])}
                 for r in eval_rows(report)]
        create_table_artifact(shown, key=key,
                              description=f"**Evaluation** of {pipeline} run `{run_id}`: metrics before / after")
        keys.append(key)
        samples = report.get("samples") or []
        rlhf = report.get("rlhf_samples") or []
        if samples or rlhf:
            lines = [f"# Generations before / after — {pipeline} `{run_id}`", ""]
            if samples:
                lines += ["| prompt | before | after |", "|---|---|---|"]
                lines += [f"| {markdown_cell(s.get('prompt'), 120)} | {markdown_cell(s.get('before'))} | {markdown_cell(s.get('after'))} |"
                          for s in samples]
            if rlhf:
                cols = [c for c in rlhf[0] if c != "query"] if isinstance(rlhf[0], dict) else []
                lines += ["", "## RLHF: SFT policy vs PPO policy", "",
                          "| query | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
                lines += ["| " + markdown_cell(s.get("query"), 120) + " | " + " | ".join(markdown_cell(s.get(c)) for c in cols) + " |"
                          for s in rlhf if isinstance(s, dict)]
            key = artifact_key(pipeline, "generations")
            create_markdown_artifact("\n".join(lines), key=key, description="Answers before and after, side by side")
            keys.append(key)

    ppo_log = curve_log(results, summary, "ppo")
    if ppo_log:
        lines = [f"# PPO reward and KL — {pipeline} `{run_id}`", ""]
        for k in PPO_CURVES:
            vals = [e.get(k) for e in ppo_log if isinstance(e.get(k), (int, float))]
            if vals:
                lines.append(f"- **{k}** `{sparkline(vals)}` first {vals[0]:.4g}, last {vals[-1]:.4g}")
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_curves(ppo_log, PPO_CURVES, f"{pipeline} ppo", Path(tmp) / "ppo.png")
            if png is not None and png.stat().st_size < 400_000:
                data = base64.b64encode(png.read_bytes()).decode()
                lines += ["", f"![reward and KL per step](data:image/png;base64,{data})"]
        lines += ["", "| step | reward_mean | reward_std | kl | kl_coef |", "|---|---|---|---|---|"]
        for e in ppo_log[-200:]:
            lines.append("| " + " | ".join(_fmt(e.get(c)) for c in ("step", "reward_mean", "reward_std", "kl", "kl_coef")) + " |")
        key = artifact_key(pipeline, "ppo")
        create_markdown_artifact("\n".join(lines), key=key, description="PPO reward and KL per step")
        keys.append(key)

    if mlflow_url:
        key = artifact_key(pipeline, "mlflow")
        create_link_artifact(mlflow_url, link_text=f"MLflow run {pipeline}/{run_id}", key=key,
                             description="The pipeline's MLflow parent run: params, curves, plots, artifacts")
        keys.append(key)
    return keys


def _change(before: Any, after: Any) -> str:
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)) or before == after:
        return "—"
    pct = f" ({(after - before) / abs(before) * 100:+.1f}%)" if before else ""
    return f"{after - before:+.4g}{pct}"


def _pm(v: Any, se: Any) -> str:
    """A figure and its standard error, as text."""
    return _fmt(v) + (f" ± {se:.2g}" if isinstance(se, (int, float)) and se == se else "")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("—" if v is None else str(v))


def mlflow_run_url(tracker: Any) -> str | None:
    """Where the parent run is seen: the tracking server itself, SHOMIN_MLFLOW_UI, or the `shomin server` here."""
    if tracker is None or not getattr(tracker, "parent_id", None):
        return None
    uri = str(getattr(tracker, "uri", ""))
    base = uri if uri.startswith(("http://", "https://")) else os.environ.get("SHOMIN_MLFLOW_UI") or _local_mlflow_ui()
    return f"{base.rstrip('/')}/#/experiments/{tracker.experiment_id}/runs/{tracker.parent_id}"


def _local_mlflow_ui() -> str:
    """The MLflow server `shomin server --detach` started in this folder, else the default port."""
    try:
        from shomin.flows.server import load
        running = load(".")
        s = running.get("mlflow") if running else None
        return s.url if s else DEFAULT_MLFLOW_UI
    except Exception:  # noqa: BLE001
        return DEFAULT_MLFLOW_UI


# ---------------------------------------------------------------- MLflow


def mlflow_extras(summary: dict, results: dict, tracker: Any, pipeline: Any = None) -> dict[str, Any]:
    """Plots, tables, tags and (optionally) a model version, through the tracker; returns what was logged."""
    logged: dict[str, Any] = {"plots": [], "tables": []}
    commit = tracker.parent_tag("git_commit")
    commit = commit if commit and commit != "unknown" else ""
    tracker.tag({"prefect_flow_run_id": summary.get("prefect_flow_run_id") or "",
                 "shomin.status": summary.get("status", ""), "mlflow.source.git.commit": commit})
    tracker.tag({"mlflow.source.git.commit": commit}, stages=True)
    with tempfile.TemporaryDirectory() as tmp:
        for stage, keys in (("sft", SFT_CURVES), ("ppo", PPO_CURVES)):
            entries = curve_log(results, summary, stage)
            if stage not in tracker.stage_runs or not entries:
                continue
            png = plot_curves(entries, keys, f"{summary.get('pipeline')} {stage}", Path(tmp) / f"{stage}_curves.png")
            if png is not None:
                tracker.log_file(png, "plots", stage)
                logged["plots"].append(f"{stage}:plots/{png.name}")
    report = eval_report(results, summary)
    if report:
        rows = eval_rows(report)
        tracker.log_table({"metric": [r["metric"] for r in rows], "before": [r["before"] for r in rows],
                           "after": [r["after"] for r in rows]}, "eval_table.json", "evaluate")
        samples = report.get("samples") or []
        if samples:
            tracker.log_table({"prompt": [s.get("prompt") for s in samples], "before": [s.get("before") for s in samples],
                               "after": [s.get("after") for s in samples]}, "generations.json", "evaluate")
        logged["tables"] += ["eval_table.json"] + (["generations.json"] if samples else [])
    if pipeline is not None and getattr(pipeline.tracking, "register_model", False) and summary.get("status") == "completed":
        logged["model_version"] = register_model(summary, results, tracker, pipeline.name)
    return logged


def register_model(summary: dict, results: dict, tracker: Any, name: str) -> dict | None:
    """The PPO adapter (RLHF pipelines) or else the merged model, as a new version of model `name`."""
    for stage, art, what in (("ppo", "adapter", "ppo-adapter"), ("merge", "merged", "merged-model")):
        path = _artifacts(results, summary, stage).get(art)
        if path and stage in tracker.stage_runs:
            return tracker.register(name, stage, path, what, summary.get("run_id", ""))
    return None


# ---------------------------------------------------------------- the hook


def publish_artifacts(summary: dict, results: dict | None, tracker: Any = None, pipeline: Any = None) -> dict:
    """Called at the end of a pipeline run (completed or failed). Never raises."""
    results = results or {}
    done: dict[str, Any] = {}
    if tracker is not None and getattr(tracker, "parent_id", None):
        try:
            done["mlflow"] = mlflow_extras(summary, results, tracker, pipeline)
        except Exception as e:  # noqa: BLE001 - pictures must never fail a run
            log.warning("shomin: MLflow plots/tables not logged: %s", e)
    try:
        done["prefect"] = prefect_artifacts(summary, results, mlflow_run_url(tracker))
    except Exception as e:  # noqa: BLE001
        log.warning("shomin: Prefect artifacts not created: %s", e)
    return done
