"""What this machine is: library versions, devices and their free memory, host RAM.

Read without importing anything fragile (bitsandbytes can crash on import) and never
raising: env_check must report a broken CUDA, not die of it.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

import torch
from shomin.tasks.ground.contract import GIB


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)  # reads metadata; never imports (bnb can crash on import)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _ram() -> tuple[int | None, int | None]:
    """(total, available) bytes; /proc/meminfo shows the host, so a cgroup v2 limit caps it."""
    try:
        import psutil
        vm = psutil.virtual_memory()
        total, avail = vm.total, vm.available
    except ImportError:
        try:
            info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            total, avail = (int(info[k].split()[0]) * 1024 for k in ("MemTotal", "MemAvailable"))
        except (OSError, KeyError, ValueError):
            return None, None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            total, avail = min(total, int(limit)), min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return total, avail


def environment() -> dict:
    """Versions and devices with total/free memory. Never raises: missing CUDA or
    bitsandbytes are reported, not fatal (env_check must run everywhere)."""
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "none"}
    versions.update({p: version(p) for p in ("transformers", "peft", "trl", "bitsandbytes", "accelerate")})
    devices: list[dict] = []
    try:
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            free, total = torch.cuda.mem_get_info(i)
            devices.append({"type": "cuda", "index": i, "name": torch.cuda.get_device_name(i),
                            "total_bytes": total, "free_bytes": free})
    except Exception as e:  # broken driver: report, let the plan say "unknown"
        devices.append({"type": "cuda", "error": f"{type(e).__name__}: {e}"})
    total, free = _ram()
    devices.append({"type": "cpu", "name": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "total_bytes": total, "free_bytes": free})
    return {"versions": versions, "devices": devices, "platform": platform.platform(), "executable": sys.executable}


# ---------------------------------------------------------------- peaks and caps


def _host_peak() -> int | None:
    """The process's resident high-water mark (VmHWM) in bytes; None off Linux."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
    except (OSError, StopIteration, ValueError):
        return None


def _reset_host_peak() -> bool:
    """Linux lets a process reset its own high-water mark ("5" to clear_refs); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of one stage: the GPU's allocated high-water mark (torch's own counter, reset on
    entry) and the process's peak resident host memory (reset on entry where Linux allows). Stages
    run one after another in one process, so each gets its own peaks; `figures` is empty until exit."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.figures: dict[str, float] = {}

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.host = _reset_host_peak()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.figures["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GIB
            self.figures["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        peak = _host_peak() if self.host else None
        if peak is not None:
            self.figures["peak_host_gib"] = peak / GIB


def cap_device_memory(gib: float | None, device: str) -> None:
    """Hold this process to `gib` of GPU 0: torch's caching allocator raises out-of-memory past it,
    exactly as a card of that size would (the plan checks against the same figure)."""
    if gib is None or not device.startswith("cuda") or not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(gib * GIB / total, 1.0), 0)
