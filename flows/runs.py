"""`shomin runs [PIPELINE]`: past runs from runs/<pipeline>/*/summary.json and MLflow.

summary.json says what this machine ran (status, per-stage status and seconds,
metrics); the MLflow parent runs add what the tracking store knows: runs made
elsewhere against the same store, and the final metrics.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

KEY_METRICS = ("loss_before", "loss_after", "perplexity_after", "reward_sft", "reward_ppo", "kl_ppo")
SHORT = {"loss_before": "loss0", "loss_after": "loss", "perplexity_after": "ppl", "reward_sft": "r_sft",
         "reward_ppo": "r_ppo", "kl_ppo": "kl"}


def _pipelines(config_path: str | Path, workdir: Path) -> dict[str, Any]:
    """name -> Pipeline (or None when only a runs/ folder is known)."""
    try:
        from shomin.tasks.registry import load_config
        found: dict[str, Any] = dict(load_config(config_path))
    except Exception:  # noqa: BLE001 - listing must work with a broken or missing file
        found = {}
    runs_root = workdir / "runs"
    if runs_root.is_dir():
        for d in sorted(runs_root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and d.name not in found and any(d.glob("*/summary.json")):
                found[d.name] = None
    return found


def _from_summary(path: Path) -> dict | None:
    from shomin.tasks.ground.rundir import settle
    s = settle(path)   # a run whose process is gone is marked interrupted here
    if s is None:
        return None
    metrics: dict[str, float] = {}
    for stage in ("ppo", "evaluate"):
        metrics.update((s.get("stages", {}).get(stage) or {}).get("metrics") or {})
    return {"pipeline": s.get("pipeline"), "run_id": s.get("run_id"), "status": s.get("status"),
            "started_at": s.get("started_at"), "seconds": s.get("seconds"), "error": s.get("error"),
            "interrupted_at": s.get("interrupted_at"), "interrupted_stage": s.get("interrupted_stage"),
            "stages": {k: {"status": v.get("status"), "seconds": v.get("seconds")} for k, v in s.get("stages", {}).items()},
            "metrics": {k: metrics[k] for k in KEY_METRICS if k in metrics},
            "mlflow_run_id": s.get("mlflow_run_id"), "prefect_flow_run_id": s.get("prefect_flow_run_id"),
            "summary": str(path), "source": "summary"}


def _mlflow_runs(name: str, pipeline: Any, workdir: Path, limit: int) -> list[dict]:
    from shomin.tasks.ground.settings import Tracking
    from shomin.tasks.ground.tracking import recent_runs
    tracking = pipeline.tracking if pipeline is not None else Tracking()
    return [{**{k: v for k, v in r.items() if k != "start_ms"}, "started_at": _iso(r["start_ms"]), "source": "mlflow"}
            for r in recent_runs(tracking, name, workdir, limit, KEY_METRICS)]


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    from datetime import datetime, timezone
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")


def collect(config_path: str | Path = "pipelines.yaml", only: str | None = None, workdir: str | Path = ".",
            mlflow: bool = True, limit: int = 20) -> list[dict]:
    workdir = Path(workdir).resolve()
    rows: list[dict] = []
    for name, p in _pipelines(config_path, workdir).items():
        if only and name != only:
            continue
        root = workdir / (p.output_dir if p is not None else "runs") / name
        local = [r for r in (_from_summary(f) for f in root.glob("*/summary.json")) if r]
        local.sort(key=lambda r: (r.get("started_at") or "", r.get("run_id") or ""), reverse=True)
        by_id = {r["run_id"]: r for r in local[:limit]}
        if mlflow:
            try:
                remote = _mlflow_runs(name, p, workdir, limit)
            except Exception as e:  # noqa: BLE001 - a store that cannot be read leaves the local list
                remote = []
                for r in by_id.values():
                    r["mlflow_error"] = str(e).splitlines()[0][:200]
            for m in remote:
                if m["run_id"] in by_id:
                    r = by_id[m["run_id"]]
                    r["mlflow_status"] = m["mlflow_status"]
                    r["metrics"] = {**m["metrics"], **r["metrics"]}
                    r["source"] = "summary+mlflow"
                else:
                    by_id[m["run_id"]] = {**m, "status": m["mlflow_status"].lower(), "stages": {}}
        merged = sorted(by_id.values(), key=lambda r: (r.get("started_at") or "", r["run_id"]), reverse=True)
        rows.extend(merged[:limit])
    return rows


def render(rows: list[dict]) -> str:
    if not rows:
        return "no runs yet (runs/<pipeline>/*/summary.json or MLflow)"
    lines = [f"{'PIPELINE':18} {'RUN ID':24} {'STATUS':10} {'STARTED':20} {'TIME':>8}  STAGES / METRICS"]
    for r in rows:
        started = (r.get("started_at") or "")[:19].replace("T", " ")
        secs = f"{r['seconds']:.0f}s" if isinstance(r.get("seconds"), (int, float)) else "—"
        stages = " ".join(f"{k}:{_stage_cell(v)}" for k, v in (r.get("stages") or {}).items())
        metrics = " ".join(f"{SHORT.get(k, k)}={v:.4g}" for k, v in (r.get("metrics") or {}).items())
        lines.append(f"{r['pipeline']:18} {r['run_id']:24} {r.get('status') or '?':10} {started:20} {secs:>8}  {stages}")
        if metrics or r.get("error"):
            lines.append(f"{'':84}{metrics}{'  error: ' + r['error'][:80] if r.get('error') else ''}")
    return "\n".join(lines)


def _stage_cell(v: dict) -> str:
    status = v.get("status") or "?"
    mark = {"completed": "", "cached": "(c)", "failed": "(FAILED)"}.get(status, f"({status})")
    secs = v.get("seconds")
    return (f"{secs:.1f}s" if isinstance(secs, (int, float)) else "—") + mark


def running(config_path: str | Path, only: str | None, workdir: Path) -> list[Path]:
    """Run folders whose summary says `running` and whose process is still there."""
    from shomin.tasks.ground.rundir import settle
    folders = []
    for name, pipeline in _pipelines(config_path, workdir).items():
        if only and name != only:
            continue
        root = workdir / (pipeline.output_dir if pipeline is not None else "runs") / name
        folders += [p.parent for p in sorted(root.glob("*/summary.json")) if (settle(p) or {}).get("status") == "running"]
    return folders


def watch_line(run: Path) -> str:
    """`pipeline/run_id  stage  the stage's latest progress line` (progress.json, flows/watch.py)."""
    import json
    try:
        state = json.loads((run / "progress.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    return f"{run.parent.name}/{run.name}  {state.get('line') or 'starting'}"


def watch(config_path: str | Path, only: str | None, workdir: str | Path = ".", interval: float = 2.0,
          out=None) -> int:
    """Follows running pipelines from another shell until none is left (or Ctrl-C): one line
    each time a run's stage, step or metrics change, then how each run ended."""
    import json
    import sys
    import time
    out, workdir = out or sys.stdout, Path(workdir)
    last: dict[Path, str] = {}
    seen = False
    while True:
        now = running(config_path, only, workdir)
        seen = seen or bool(now)
        for run in now:
            line = watch_line(run)
            if last.get(run) != line:
                print(line, file=out, flush=True)
                last[run] = line
        for run in [r for r in last if r not in now]:
            status = json.loads((run / "summary.json").read_text(encoding="utf-8")).get("status")
            print(f"{run.parent.name}/{run.name}  {status}", file=out, flush=True)
            del last[run]
        if not now:
            if not seen:
                print(f"no run{' of ' + only if only else ''} is running", file=out, flush=True)
            return 0
        time.sleep(interval)
