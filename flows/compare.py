"""`shomin compare RUN_A RUN_B`: two runs' metrics side by side, with their standard
errors, and which differences are within noise (less than twice the standard error of
the difference). A run is its folder (runs/<pipeline>/<run_id>) or `<pipeline>/<run_id>`."""
from __future__ import annotations

import json
import math
from pathlib import Path

from shomin.tasks.models.stats import within_noise


def metrics_of(run: Path) -> dict[str, float]:
    """Every stage's metrics; evaluate's last, so its figures win a name clash."""
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    stages = summary.get("stages", {})
    order = [s for s in stages if s != "evaluate"] + (["evaluate"] if "evaluate" in stages else [])
    out: dict[str, float] = {}
    for stage in order:
        out.update((stages[stage] or {}).get("metrics") or {})
    return out


def compare(a: dict[str, float], b: dict[str, float]) -> list[dict]:
    rows = []
    for name in [k for k in a if k in b and not k.endswith("_se")]:
        se_a, se_b = a.get(f"{name}_se", math.nan), b.get(f"{name}_se", math.nan)
        rows.append({"metric": name, "a": a[name], "a_se": se_a, "b": b[name], "b_se": se_b,
                     "diff": b[name] - a[name], "within_noise": within_noise(a[name], se_a, b[name], se_b)})
    return rows


def _fmt(v: float, se: float) -> str:
    return f"{v:.4g}" + ("" if math.isnan(se) else f" ± {se:.2g}")


def render(rows: list[dict], name_a: str, name_b: str) -> str:
    verdict = {True: "within noise", False: "differs", None: "no error bar"}
    lines = [f"{'metric':24} {name_a[:26]:>26} {name_b[:26]:>26} {'B - A':>10}  ",
             "-" * 100]
    for r in rows:
        lines.append(f"{r['metric']:24} {_fmt(r['a'], r['a_se']):>26} {_fmt(r['b'], r['b_se']):>26} "
                     f"{r['diff']:>+10.4g}  {verdict[r['within_noise']]}")
    return "\n".join(lines)
