"""The layers point one way (an AST check of every import in flows/ and tasks/):

    ground  <-  models (and levers)  <-  stages  <-  registry  <-  flows

No stage imports another stage; settings import no runtime code; nothing imports the
uninstalled top-level names `tasks` or `flows` (installed, they are shomin.tasks and
shomin.flows). Adding a stage is its module and one line in tasks/registry.py."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit
LAYERS = {"ground": 0, "models": 1, "stages": 2, "registry": 3, "flows": 4}
RUNTIME = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "prefect", "mlflow")


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] == ["shomin", "flows"]:
        return "flows"
    if parts[:2] == ["shomin", "tasks"]:
        return parts[2] if len(parts) > 2 and parts[2] in LAYERS else ("registry" if parts[2:3] == ["registry"] else None)
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = ["shomin", *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


SOURCES = sorted([*ROOT.glob("flows/*.py"), *ROOT.glob("tasks/**/*.py")])


def violations(path: Path) -> list[str]:
    me = module_name(path)
    mine = layer_of(me)
    out = []
    for line, target in imports(path):
        where = f"{path.relative_to(ROOT)}:{line} imports {target}"
        if target.split(".")[0] in ("tasks", "flows"):
            out.append(f"{where}: use shomin.{target}")
        theirs = layer_of(target)
        if theirs is None or mine is None:
            continue
        if LAYERS[theirs] > LAYERS[mine]:
            out.append(f"{where}: {mine} may not import {theirs}")
        if mine == "stages" == theirs and target.count(".") >= 3 and not me.startswith(".".join(target.split(".")[:4])):
            out.append(f"{where}: a stage imports another stage")
        if me == "shomin.tasks.ground.settings" and (theirs != "ground" or target.startswith(RUNTIME)):
            out.append(f"{where}: settings import no runtime code")
    if me == "shomin.tasks.ground.settings":
        out += [f"{path.relative_to(ROOT)}:{line} imports {t}: settings import no runtime code"
                for line, t in imports(path) if t.split(".")[0] in RUNTIME or t.startswith("shomin.tasks.models")]
    return out


def test_every_import_points_down_the_layers():
    assert len(SOURCES) > 20
    found = [v for path in SOURCES for v in violations(path)]
    assert found == [], "\n".join(found)


def test_the_check_catches_each_kind_of_violation(tmp_path, monkeypatch):
    """The checker itself: a stage importing a stage, ground importing models, a bare `tasks` import."""
    stage = ROOT / "tasks" / "stages" / "merge.py"
    bad = {stage: "from shomin.tasks.stages.sft import SftSettings\n",
           ROOT / "tasks" / "ground" / "hub.py": "from shomin.tasks.models.loading import load_causal_lm\n",
           ROOT / "tasks" / "models" / "rl.py": "from tasks.ground import hub\n",
           ROOT / "tasks" / "ground" / "settings.py": "import torch\n"}
    real_read = Path.read_text

    def read(self, *a, **k):
        return real_read(self, *a, **k) + bad.get(self, "")
    monkeypatch.setattr(Path, "read_text", read)
    found = "\n".join(v for path in bad for v in violations(path))
    for want in ("a stage imports another stage", "ground may not import models", "use shomin.tasks.ground",
                 "settings import no runtime code"):
        assert want in found, found


def test_mlflow_is_spoken_to_in_one_place():
    """Only tasks/ground/tracking.py imports mlflow: the tracker knows the runs it created."""
    talking = sorted({str(path.relative_to(ROOT)) for path in SOURCES
                      for _, target in imports(path) if target.split(".")[0] == "mlflow"})
    assert talking == ["tasks/ground/tracking.py"]
