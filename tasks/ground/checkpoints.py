"""One checkpoint store for every stage that checkpoints.

A training stage writes numbered checkpoints (`<prefix>-<step>`) into a folder that
outlives the run, keyed by the stage's inputs, so a killed run started again with the
same command resumes from the newest *complete* one. The store adds what every such
stage needs and none should write twice:

- a lock: one process at a time trains into a folder. A second run of the same inputs
  started meanwhile gets a private folder (removed afterwards) instead of resuming
  from, or rotating away, the other's checkpoints. The lock is an flock, so it dies
  with its process and a killed run never blocks the rerun that resumes it;
- the latest complete checkpoint: the stage says what "complete" means (the file its
  writer writes last); a checkpoint cut off mid-save is skipped;
- atomic saves for stages that write their own (temp folder + rename, keep the last N);
- cleanup after success: once the stage's output is in its run folder (and cached),
  the checkpoints have done their job.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator


@dataclass
class Claim:
    """A folder this process may train into; `owned` is False for a concurrent run's private folder."""
    folder: Path
    owned: bool


@contextlib.contextmanager
def claim(root: str | Path) -> Iterator[Claim]:
    """Lock `root` for this process for the block; on success the checkpoints are removed.
    On failure (or a kill) they stay for the rerun to resume from."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no protection between runs
        fcntl = None
    with open(root.parent / f"{root.name}.lock", "a+") as lock:
        owned = True
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owned = False
        folder = root if owned else root.with_name(f"{root.name}.concurrent-{os.getpid()}")
        try:
            yield Claim(folder, owned)
        except BaseException:
            if not owned:  # a private folder has no later run to resume it
                shutil.rmtree(folder, ignore_errors=True)
            raise
        shutil.rmtree(folder, ignore_errors=True)


def trainer_complete(ckpt: Path) -> bool:
    """A transformers Trainer checkpoint: the Trainer writes trainer_state.json last, so one
    without a readable one (and its weights) was cut off mid-save."""
    import json
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any(ckpt.glob("adapter_model.safetensors")) or any(ckpt.glob("model*.safetensors"))


def _step(path: Path, prefix: str) -> int | None:
    head, _, tail = path.name.rpartition("-")
    return int(tail) if head == prefix and tail.isdigit() and path.is_dir() else None


def complete(folder: str | Path, prefix: str, is_complete: Callable[[Path], bool]) -> list[tuple[int, Path]]:
    """The complete checkpoints under `folder`, oldest first, as (step, path)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(_step(p, prefix), p) for p in folder.glob(f"{prefix}-*")]
    return sorted((s, p) for s, p in found if s is not None and is_complete(p))


def latest(folder: str | Path, prefix: str, is_complete: Callable[[Path], bool]) -> tuple[Path | None, int | None]:
    """The newest complete checkpoint and its step, or (None, None)."""
    found = complete(folder, prefix, is_complete)
    return (found[-1][1], found[-1][0]) if found else (None, None)


def save(folder: str | Path, prefix: str, step: int, write: Callable[[Path], None],
         is_complete: Callable[[Path], bool], keep: int = 2) -> Path:
    """`write(tmp)` fills a temp folder that is renamed to `<prefix>-<step>`; keeps the newest `keep`."""
    folder = Path(folder)
    tmp = folder / f".{prefix}-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:   # a full disk, a crash: no half-written temp folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = folder / f"{prefix}-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in complete(folder, prefix, is_complete)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prune_incomplete(folder: str | Path, prefix: str, is_complete: Callable[[Path], bool]) -> list[str]:
    """Remove checkpoints cut off mid-save (and temp folders of `save`), e.g. after the disk
    filled during one; the complete ones stay for the rerun. Returns the names removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cut = [p for p in folder.glob(f"{prefix}-*") if _step(p, prefix) is not None and not is_complete(p)]
    cut += [p for p in folder.glob(f".{prefix}-*.tmp-*") if p.is_dir()]
    for p in cut:
        shutil.rmtree(p, ignore_errors=True)
    return sorted(p.name for p in cut)
