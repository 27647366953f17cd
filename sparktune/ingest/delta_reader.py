"""Delta: a table by path or by catalog name, read at one pinned version.

The count is the row counts in the Delta log (deltalake, without Spark); only a store that
deltalake cannot open falls back to Spark's count of the same pinned version.
"""

from __future__ import annotations

from sparktune.errors import SparktuneError
from sparktune.ingest.frame import Loaded, ReadOptions, SourceCount, typed
from sparktune.ingest.sources import SourceKind
from sparktune.redact import redact
from sparktune.tables import read_snapshot, read_table, table_exists

__all__ = ["METHOD", "count", "read"]

METHOD = "Delta log row counts (deltalake)"


def count(location: str, version: int) -> int:
    """Rows of the table at ``version`` from the log's per-file counts (deletion vectors: a scan)."""
    import pyarrow as pa
    from deltalake import DeltaTable

    table = DeltaTable(location, version=version)
    actions = table.get_add_actions(flatten=True)
    actions = pa.table(actions) if not isinstance(actions, pa.Table) else actions
    names = actions.column_names
    has_dv = "deletionVector.storageType" in names and actions.column("deletionVector.storageType").null_count < len(
        actions
    )
    if "num_records" in names and actions.column("num_records").null_count == 0 and not has_dv:
        return int(sum(actions.column("num_records").to_pylist()))
    return table.to_pyarrow_dataset().count_rows()


def read(spark, kind: SourceKind, location: str, options: ReadOptions) -> Loaded:
    if kind is SourceKind.TABLE and not table_exists(spark, location):
        raise SparktuneError(f"--source {redact(location)!r}: no such table in the session's catalog")
    # the one snapshot reader pins the version and the table id; a failure there is an error, not a blank id
    snapshot = read_snapshot(spark, location, what="--source")
    version = snapshot.version
    try:
        records: int | None = count(snapshot.location, version)
        method = METHOD
    except Exception:  # a store deltalake cannot open without credentials: Spark counts instead
        records, method = None, "Spark count (deltalake could not open the table)"
    df = read_table(spark, location, version=version, what="--source")
    if records is None:
        records = df.count()
    frame, keep, dropped = typed(df, options.text_column, options.label_column, options.split or "train")
    pinned = {"sparktune.source_version": str(version), "sparktune.source_table_id": snapshot.table_id}
    return Loaded(frame, SourceCount(records, method), keep, dropped, pinned)
