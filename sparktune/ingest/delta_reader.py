"""Delta: a table by path or by catalog name, read at one pinned version.

The count is the row counts in the Delta log (deltalake, without Spark); only a store that
deltalake cannot open falls back to Spark's count of the same pinned version.
"""

from __future__ import annotations

from typing import cast

from sparktune.errors import SparktuneError
from sparktune.ingest.frame import Loaded, ReadOptions, SourceCount, typed
from sparktune.ingest.sources import SourceKind
from sparktune.redact import redact
from sparktune.tables import parse_table_ref, table_exists, table_location

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


def _pin(path: str) -> tuple[int | None, int | None, str]:
    """``(version, records, method)``; ``(None, None, ...)`` when deltalake cannot open the table."""
    from deltalake import DeltaTable

    try:
        version = DeltaTable(path).version()
        return version, count(path, version), METHOD
    except Exception:  # a store deltalake cannot open without credentials: Spark counts instead
        return None, None, "Spark count (deltalake could not open the table)"


def read(spark, kind: SourceKind, location: str, options: ReadOptions) -> Loaded:
    if kind is SourceKind.TABLE and not table_exists(spark, location):
        raise SparktuneError(f"--source {redact(location)!r}: no such table in the session's catalog")
    path = location if kind is SourceKind.DELTA else table_location(spark, location)
    version, records, method = _pin(path)
    if kind is SourceKind.DELTA:
        reader = spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        df = reader.load(path)
    else:
        at = f" VERSION AS OF {version}" if version is not None else ""
        df = spark.sql(f"SELECT * FROM {parse_table_ref(location).sql}{at}")
    if records is None:
        records = df.count()
    frame, keep, dropped = typed(df, options.text_column, options.label_column, options.split or "train")
    pinned = {"sparktune.source_version": str(version) if version is not None else ""}
    try:
        from deltalake import DeltaTable

        # deltalake types Metadata.id as int; it is the table id string (a UUID)
        pinned["sparktune.source_table_id"] = cast(str, DeltaTable(path).metadata().id)
    except Exception:  # see _pin
        pass
    return Loaded(frame, SourceCount(records, method), keep, dropped, pinned)
