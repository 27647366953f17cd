"""Rank failures as structured records, so the driver can tell the user exactly what went wrong.

A rank that dies of an exception writes ``<checkpoint_dir>/failures/rank-<N>.json`` before it
exits (shared storage, like the checkpoints)::

    {"rank": 1, "world_size": 2, "exc_type": "ConfigError", "exc_module": "sparktune.errors",
     "message": "<str(exc), every line>", "problems": [...] (ConfigError only),
     "traceback": "<formatted traceback>", "retriable": false, "reason": "user error", "time": ...}

The driver reads them after a failed launch (``read_failures``), raises a user error whole
(``user_error``) instead of relaunching, and relaunches only for failures a retry can fix
(``is_retriable``). A rank killed by a signal writes nothing; then the regex over the
launcher's output (``user_error_in_output``) is the fallback.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
import traceback
from dataclasses import asdict, dataclass, field

from sparktune.errors import ConfigError, SparktuneError

__all__ = ["FailureRecord", "failure_dir", "classify", "record_failure", "read_failures", "clear_failures",
           "user_error", "user_error_in_output", "DataFilesGone"]

FAILURES = "failures"


class DataFilesGone(SparktuneError):
    """A data file of the pinned table version is gone (VACUUM removed it): no retry brings it back."""


@dataclass
class FailureRecord:
    rank: int
    world_size: int
    exc_type: str
    exc_module: str
    message: str
    traceback: str
    retriable: bool
    reason: str
    problems: list[str] = field(default_factory=list)
    time: float = 0.0

    def headline(self) -> str:
        return f"rank {self.rank}: {self.exc_type}: {self.message.splitlines()[0] if self.message else ''}"


def failure_dir(checkpoint_dir: str) -> str:
    return os.path.join(checkpoint_dir, FAILURES)


def _chain(exc: BaseException):
    """``exc`` and its causes/contexts."""
    seen = set()
    item: BaseException | None = exc
    while item is not None and id(item) not in seen:
        seen.add(id(item))
        yield item
        item = item.__cause__ or item.__context__


def classify(exc: BaseException) -> tuple[bool, str]:
    """``(retriable, reason)``: only failures a relaunch can fix are retriable.

    Not retriable: user errors (SparktuneError, ConfigError), a disk that is full (ENOSPC,
    EDQUOT), data files that are gone (VACUUM). Everything else (a killed peer, a lost
    connection, a preempted node) may pass on a retry.
    """
    for item in _chain(exc):
        if isinstance(item, DataFilesGone):
            return False, "data files gone"
        if isinstance(item, SparktuneError):
            return False, "user error"
        if isinstance(item, OSError) and item.errno in (errno.ENOSPC, errno.EDQUOT):
            return False, "disk full"
    text = str(exc)
    if "No space left on device" in text:
        return False, "disk full"
    return True, "may pass on a retry"


def _fsync_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def record_failure(checkpoint_dir: str, rank: int, world_size: int, exc: BaseException) -> FailureRecord | None:
    """Write this rank's failure record; never raises (the original error matters more)."""
    retriable, reason = classify(exc)
    record = FailureRecord(
        rank=rank, world_size=world_size, exc_type=type(exc).__name__, exc_module=type(exc).__module__,
        message=str(exc), traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        retriable=retriable, reason=reason, problems=list(getattr(exc, "problems", []) or []), time=time.time(),
    )
    try:
        folder = failure_dir(checkpoint_dir)
        os.makedirs(folder, exist_ok=True)
        _fsync_write(os.path.join(folder, f"rank-{rank}.json"), json.dumps(asdict(record), indent=2))
    except OSError:
        return None  # e.g. the disk is full: the launcher's output still carries the error
    return record


def read_failures(checkpoint_dir: str) -> list[FailureRecord]:
    """The records of the last launch, in rank order (unreadable ones are skipped)."""
    folder = failure_dir(checkpoint_dir)
    if not os.path.isdir(folder):
        return []
    records = []
    for name in sorted(os.listdir(folder)):
        if not re.fullmatch(r"rank-\d+\.json", name):
            continue
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                data = json.load(handle)
            records.append(FailureRecord(**data))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(records, key=lambda r: r.rank)


def clear_failures(checkpoint_dir: str) -> None:
    """Remove the records of an earlier launch (before a new one starts)."""
    folder = failure_dir(checkpoint_dir)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def user_error(records: list[FailureRecord]) -> SparktuneError | None:
    """The error to raise for a launch whose ranks failed in a way no retry fixes, or None.

    A ConfigError comes back as a ConfigError with the same problems; other errors as a
    SparktuneError with the rank's whole message (every line).
    """
    fatal = [r for r in records if not r.retriable]
    if not fatal:
        return None
    first = fatal[0]
    ranks = sorted({r.rank for r in fatal if r.message == first.message})
    where = f"training rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {first.world_size}"
    if first.exc_type == "ConfigError" and first.problems:
        return ConfigError(first.problems, source=where)
    if first.reason == "user error" or first.reason == "data files gone":
        return SparktuneError(f"{where}: {first.message}")
    return SparktuneError(f"{where} failed ({first.reason}), which a relaunch cannot fix: "
                          f"{first.exc_type}: {first.message}")


_USER_ERROR = re.compile(r"sparktune\.errors\.(?:SparktuneError|ConfigError): (.*)")


def user_error_in_output(output: str) -> str | None:
    """Fallback when no record came back: the first line of a SparktuneError in the launcher's output."""
    found = _USER_ERROR.findall(output)
    return found[-1].strip() if found else None
