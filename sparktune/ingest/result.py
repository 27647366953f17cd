"""What ingest returns, and where its quarantine goes by default."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparktune.redact import redact
from sparktune.results import StageResult
from sparktune.tables import parse_table_ref

__all__ = ["IngestResult", "default_quarantine_ref"]


@dataclass
class IngestResult(StageResult):
    output: str
    quarantine: str
    input_rows: int
    raw_rows: int
    quarantined_rows: int
    output_version: int
    quarantine_version: int
    reasons: dict
    run_id: str = ""
    count_method: str = ""
    dropped_columns: list = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"input rows:       {self.input_rows:>10,}  (counted at the source: {self.count_method})",
            f"raw rows:         {self.raw_rows:>10,}  -> {redact(self.output)} (Delta version {self.output_version})",
            (f"quarantined rows: {self.quarantined_rows:>10,}  -> {redact(self.quarantine)} "
             f"(Delta version {self.quarantine_version})"),
        ]
        for reason, count in sorted(self.reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {count:>8,}  {reason}")
        if self.dropped_columns:
            lines.append("source columns not stored in the raw table (names Delta cannot store, or clashing): "
                         + ", ".join(repr(redact(c)) for c in self.dropped_columns))
        lines.append(f"run id: {self.run_id}")
        return "\n".join(lines)


def default_quarantine_ref(output: str) -> str:
    ref = parse_table_ref(output)
    if ref.name is None:  # a path
        return output.rstrip("/") + "_quarantine"
    return ref.name + "_quarantine"
