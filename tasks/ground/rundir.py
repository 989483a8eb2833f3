"""Run folders: runs/<pipeline>/<run_id>/<stage>/ and summary.json.

A stage writes into a hidden staging folder and renames it into place only
when complete, so a folder named after a stage is always whole: a crash leaves
at most a `.<stage>.partial-*` folder that nothing downstream reads.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from shomin.tasks.ground.errors import is_disk_full
from shomin.tasks.ground.records import StageResult


def new_run_id() -> str:
    """Sortable by time, unique across concurrent runs of one pipeline."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON via a temp file + rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic(path, text)


def _atomic(path: Path, text: str) -> None:
    """Write a temp file and rename it over `path`; a failed write (a full disk) leaves neither."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(2)}")
    try:
        tmp.write_text(text, encoding="utf-8")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield a scratch folder that becomes `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = final.with_name(f".{final.name}.partial-{os.getpid()}-{secrets.token_hex(2)}")
    scratch.mkdir()
    try:
        yield scratch
    except BaseException as e:
        if is_disk_full(e):   # say how far it got before the folder goes
            e.shomin_written = folder_bytes(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    write_manifest(scratch)
    if final.exists():  # a retry of the same stage in the same run replaces the old copy
        shutil.rmtree(final)
    os.replace(scratch, final)


MANIFEST = ".shomin-manifest.json"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def write_manifest(folder: Path) -> None:
    """Every file of a finished stage folder and its size, so a later cache hit can tell a
    folder someone deleted from or truncated (a disk that filled up, a copy cut short)."""
    files = {f.relative_to(folder).as_posix(): f.stat().st_size for f in sorted(folder.rglob("*"))
             if f.is_file() and f.name != MANIFEST}
    write_json(folder / MANIFEST, files)


def intact(folder: str | Path) -> bool:
    """The folder exists and every file its manifest lists is there at its size (a folder
    written before manifests existed counts as intact)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    for rel, size in files.items():
        try:
            if (folder / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


class RunDir:
    """One pipeline run's folder and its summary.json."""

    def __init__(self, root: str | Path, pipeline: str, run_id: str | None = None):
        self.run_id = run_id or new_run_id()
        self.pipeline = pipeline
        self.path = Path(root).resolve() / pipeline / self.run_id
        self.path.mkdir(parents=True, exist_ok=False)
        self.summary: dict[str, Any] = {
            "pipeline": pipeline, "run_id": self.run_id, "status": "running",
            "started_at": _now(), "finished_at": None, "mlflow_run_id": None,
            "prefect_flow_run_id": None, "stages": {}, "process": this_process(),
        }
        self._t0 = time.time()
        self.save()

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def link_stage(self, stage: str, existing: str | Path) -> None:
        """A cached stage: point this run's stage folder at the run that made it."""
        target = Path(existing)
        link = self.stage_dir(stage)
        if target.resolve() != link.resolve() and not link.exists():
            link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)

    def record_stage(self, stage: str, status: str, result: StageResult | None = None,
                     error: str | None = None, seconds: float | None = None) -> None:
        entry: dict[str, Any] = {"status": status}
        if result is not None:
            entry.update(seconds=round(result.seconds, 3), metrics=result.metrics,
                         artifacts=result.artifacts, output_dir=result.output_dir)
            if result.resumed_from_step is not None:
                entry["resumed_from_step"] = result.resumed_from_step
        if seconds is not None:
            entry["seconds"] = round(seconds, 3)
        if error:
            entry["error"] = error
        self.summary["stages"][stage] = entry
        self.save()

    def finish(self, status: str, error: str | None = None) -> None:
        self.summary.update(status=status, finished_at=_now(), seconds=round(time.time() - self._t0, 3))
        if error:
            self.summary["error"] = error
        self.save()

    def save(self) -> None:
        write_json(self.path / "summary.json", self.summary)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows a stage wrote with one JSON object per line (the dataset stage's train/eval sets)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def markdown_cell(text: object, width: int = 300) -> str:
    """Text safe inside a markdown table cell: pipes escaped, newlines as <br>, cut to `width`."""
    return "—" if text is None else (str(text).replace("|", "\\|").replace("\n", "<br>")[:width] or "(empty)")


# ---------------------------------------------------------------- runs that were killed


def this_process() -> dict:
    """Who is running this run: host, pid and the process's start time (so a reused pid is
    not taken for the run's own process)."""
    import socket
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux /proc), None where it cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(process: dict) -> bool | None:
    """Whether the process that wrote a summary still runs; None when this machine cannot tell."""
    import socket
    if not process or process.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(process["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError, KeyError):
        return None
    start = _process_start(int(process["pid"]))
    return start is None or process.get("start") is None or start == process["start"]


def settle(summary_path: str | Path) -> dict | None:
    """Read a summary; a run still marked `running` whose process is gone (killed, machine
    restarted) is marked `interrupted`, with when (the summary's last write) and in which
    stage, and written back. Every look at a run folder goes through here."""
    path = Path(summary_path)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if summary.get("status") != "running" or _alive(summary.get("process") or {}) is not False:
        return summary
    running = [k for k, v in (summary.get("stages") or {}).items() if (v or {}).get("status") == "running"]
    when = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    for stage in running:
        summary["stages"][stage]["status"] = "interrupted"
    stage = running[-1] if running else None
    summary.update(status="interrupted", interrupted_at=when, interrupted_stage=stage,
                   error=f"interrupted{f' in stage {stage}' if stage else ''} (last written {when}): the process "
                         "running it ended without finishing; the same command resumes it")
    write_json(path, summary)
    return summary


def settle_all(root: str | Path, pipeline: str) -> list[dict]:
    """settle() every run of `pipeline` under `root` (its output_dir)."""
    return [s for s in (settle(p) for p in sorted((Path(root) / pipeline).glob("*/summary.json"))) if s]
