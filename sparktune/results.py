"""Typed stage results: what each stage returns, prints as a table, or as ``--json``.

A stage function returns a dataclass deriving from ``StageResult``; its CLI prints
``summary()`` or, with ``--json``, ``to_json()``. Later stages take the object itself, never
text parsed back from stdout.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Any

__all__ = ["StageResult", "to_plain"]


def to_plain(value: Any) -> Any:
    """JSON-ready form of a result value: dataclasses and mappings recursively, enums by value,
    non-finite floats as None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.repr}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return to_plain(value.item())
    return value


class StageResult:
    """Base for stage results (dataclasses): ``summary()`` for people, ``to_dict()`` for programs."""

    def summary(self) -> str:
        return "\n".join(f"{k}: {v}" for k, v in self.to_dict().items())

    def to_dict(self) -> dict:
        return to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)
