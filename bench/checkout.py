"""Import shomin from this checkout without installing it (the lent GPU machine has no
`pip install -e .`): the folders flows/ and tasks/ are the packages shomin.flows and
shomin.tasks, so a `shomin` package whose path is the repository root is all it takes.
An installed shomin is left alone."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("shomin") is None:
    package = types.ModuleType("shomin")
    package.__path__ = [str(ROOT)]
    sys.modules["shomin"] = package
