"""What can go wrong, by whose fault. A user mistake (`ConfigError` and its kinds) is one
line naming the file, field or row, exit 2, never retried; a failure while running is
exit 1 with one line saying what to change."""
from __future__ import annotations


def one_line(text: object) -> str:
    return " ".join(str(text).split())


class ConfigError(ValueError):
    """A user mistake in configuration or input; str() is one line."""


class DataError(ConfigError):
    """Bad dataset content; one line naming file, row and column."""


class RewardError(ConfigError):
    """A reward that cannot be built or returned bad scores; one line."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class MemoryPlanError(ConfigError):
    """The predicted peak does not fit; str() is one line naming what to lower."""


class OutOfMemory(RuntimeError):
    """CUDA ran out of memory in a stage; str() is one line naming what to lower."""


class TrainingDiverged(RuntimeError):
    """Loss became NaN or inf: stop before a broken adapter is used anywhere."""


class DiskFull(RuntimeError):
    """A stage ran out of disk space; str() is one line naming the folder and what it needed."""


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in the chain; safetensors and torch report it inside their own errors."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) == 28 or "No space left on device" in str(error) or "StorageFull" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False
