"""Incremental rebuilds of a derived table keyed by ``row_id`` (tokenize, predict).

A derived table holds one or more rows per source row, keyed by the source's ``row_id``. When
the source has only changed since the version the derived table reflects, only the changed
rows need work:

- ``source_changes`` finds the ``row_id``s whose rows changed between two source versions, the
  first way that applies (``ChangeSource``):

  1. Delta's change data feed, where the source has it (``delta.enableChangeDataFeed``, on for
     the tables ``sparktune ingest`` creates) for the whole range.
  2. Without the feed, when every commit of the range only added files (an append, an
     insert-only ``MERGE``, a streaming append; property changes and VACUUM in between), the
     changed rows are exactly the rows of the added files: the files of the new version that the
     old version did not have, read directly. The history and the file lists come from the Delta
     log (``tables.commits`` and ``tables.file_layout``: delta-rs for a local table, in
     milliseconds; else ``DESCRIBE HISTORY`` and ``inputFiles()``). Not for partitioned tables
     or column mapping (their files do not hold the rows as the table shows them).
  3. Else by comparing a hash of each row's content at the two versions (time travel; a
     ``row_id`` present at one version and not the other, or present at both with other
     content): a full scan of both versions, always right.
- ``apply_changes`` commits the result as ONE new version of the derived table: a plain append
  when the source only gained rows (1 with inserts only, or 2), else one ``MERGE`` that
  deletes every derived row of a changed ``row_id`` and inserts the rows recomputed from the
  source's new version. The MERGE matches on distinct keys only and inserts with a null key, so
  duplicate ``row_id``s (which a writer other than ingest can create) are rebuilt exactly as a
  full rebuild would rebuild them.

Delta cannot change table properties in an append or MERGE commit, so what a derived table
reflects is recorded in the commit's ``userMetadata`` (``spark.databricks.delta.commitInfo
.userMetadata``), which is also what the stages' caches read back (``last_provenance``).
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Any

from sparktune.tables import Commit, commit_metadata, commits, data_files, file_layout, last_commit, parse_table_ref

__all__ = ["Applied", "ChangeSource", "SourceChanges", "apply_changes", "history_unreadable", "last_provenance",
           "source_changes"]

_KEY = "_sparktune_key"
_CDF_PROPERTY = "delta.enableChangeDataFeed"


# What Spark/Delta say when an old version's log or files are gone (VACUUM, log retention).
_UNREADABLE_HISTORY = ("FileNotFound", "FILE_NOT_FOUND", "VersionNotFound", "VERSION_NOT_FOUND", "TIME_TRAVEL",
                       "TIMETRAVEL", "DELTA_MISSING_CHANGE_DATA", "CHANGE_DATA_FEED")


def history_unreadable(exc: BaseException) -> bool:
    """True when ``exc`` says the source's old version (or its change feed) can no longer be read:
    the caller rebuilds in full, which is always right."""
    return any(marker in str(exc) for marker in _UNREADABLE_HISTORY)


class ChangeSource(str, enum.Enum):
    """How the changed rows were found."""

    CHANGE_DATA_FEED = "change-data-feed"
    APPENDED_FILES = "appended-files"
    """No change data feed, but the range only appended: the rows of the files it added."""
    ROW_DIFF = "row-diff"
    """A row_id + content hash comparison of the two source versions (no change data feed)."""


@dataclass
class SourceChanges:
    base_version: int
    version: int
    via: ChangeSource
    keys: Any
    """DataFrame of the distinct changed ``row_id``s (column ``row_id``)."""
    inserted: Any | None
    """When the source only gained rows: a DataFrame of exactly those rows (append them); else None."""


def _changed_types(changes) -> set:
    from pyspark.sql import functions as F

    return {r[0] for r in changes.select(F.col("_change_type")).distinct().collect()}


def _read_change_feed(spark, ref, start: int, end: int):
    reader = (spark.read.format("delta").option("readChangeFeed", "true")
              .option("startingVersion", start).option("endingVersion", end))
    return reader.load(ref.path) if ref.is_path else reader.table(ref.name)


def source_changes(spark, source, base_version: int, version: int, columns: list[str],
                   key: str = "row_id") -> SourceChanges:
    """The rows of ``source`` that changed from ``base_version`` to ``version``.

    ``columns``: what the derived rows are computed from (with ``key``); a change to any other
    column does not count. Raises whatever Spark raises when neither the change feed nor the
    old version can be read (e.g. vacuumed): the caller falls back to a full rebuild.
    """
    from pyspark.sql import functions as F

    ref = parse_table_ref(source)
    try:
        # No property lookup first: reading a feed that is off (or off for part of the range) fails at once.
        changes = _read_change_feed(spark, ref, base_version + 1, version)
        types = _changed_types(changes)
    except Exception:  # noqa: BLE001  (no feed for this range: compare the two versions instead)
        changes = None
    if changes is not None:
        keys = changes.select(F.col(key)).distinct()
        inserted = (changes.where(F.col("_change_type") == "insert").select(*columns)
                    if types <= {"insert"} else None)
        return SourceChanges(base_version, version, ChangeSource.CHANGE_DATA_FEED, keys, inserted)

    from sparktune.tables import read_table

    try:
        appended = _appended_rows(spark, ref, base_version, version, columns)
    except Exception:  # noqa: BLE001  (the log or a file cannot be read this way: the row diff decides)
        appended = None
    if appended is not None:
        return SourceChanges(base_version, version, ChangeSource.APPENDED_FILES, appended.select(F.col(key)).distinct(),
                             appended)

    def hashed(at: int):
        df = read_table(spark, ref, version=at, what="source")
        content = [c for c in columns if c != key]
        # Two 64-bit hashes of the content: a changed row is missed only if both collide.
        return df.select(F.col(key), F.xxhash64(*content).alias("_h1"), F.hash(*content).alias("_h2"))

    old, new = hashed(base_version), hashed(version)
    keys = new.exceptAll(old).unionByName(old.exceptAll(new)).select(F.col(key)).distinct()
    return SourceChanges(base_version, version, ChangeSource.ROW_DIFF, keys, None)


# Commits that change no data file (VACUUM deletes only files no version since the range's start uses).
_NO_DATA_CHANGE = frozenset({"VACUUM START", "VACUUM END"})
# Operation metrics that say a commit removed or rewrote rows (Spark's names; delta-rs' alike).
_REMOVALS = re.compile(r"removed|deleted|updated|deletionvector|copied", re.IGNORECASE)
# Hadoop expands these in a path given to a reader; a file named with one is read the other way.
_GLOB = re.compile(r"[*?\[\]{}\\]")


def _only_added_files(commit: Commit) -> bool:
    """True when a commit added data files and removed none, or changed no data file and nothing
    about how the files are read."""
    operation, parameters, metrics = commit.operation, commit.parameters, commit.metrics
    if operation in _NO_DATA_CHANGE:
        return True
    if any(_REMOVALS.search(k) and v.strip() not in ("", "0") for k, v in metrics.items()):
        return False
    if operation == "WRITE":
        return parameters.get("mode") == "Append"
    if operation == "STREAMING UPDATE":
        return parameters.get("outputMode") == "Append"
    if operation == "MERGE":  # insert-only: no rows matched, no file rewritten
        return metrics.get("numTargetFilesRemoved") == "0"
    if operation == "SET TBLPROPERTIES":
        return "columnMapping" not in parameters.get("properties", "")
    return False


def _appended_rows(spark, ref, base_version: int, version: int, columns: list[str]):
    """The rows ``source_changes`` way 2 finds (``columns`` of the files the range added), or
    None when some commit of the range did more than add files, or the table's files do not
    hold its rows as they are (partitions, column mapping)."""
    from sparktune.tables import read_table

    history = commits(spark, ref, base_version + 1, version)
    if [c.version for c in history] != list(range(base_version + 1, version + 1)):
        return None  # part of the range is gone from the history
    if not all(_only_added_files(c) for c in history):
        return None
    now = file_layout(spark, ref, version)
    if now.partition_columns or now.column_mapping != "none":
        return None
    added = sorted(now.files - data_files(spark, ref, base_version))
    if any(_GLOB.search(f) for f in added):
        return None
    schema = read_table(spark, ref, version=version, what="source").select(*columns).schema
    if not added:
        return spark.createDataFrame([], schema)
    return spark.read.schema(schema).parquet(*added).select(*columns)


@dataclass(frozen=True)
class Applied:
    """The commit ``apply_changes`` made."""

    version: int
    inserted: int
    deleted: int


def apply_changes(target, rows, changes: SourceChanges, user_metadata: dict, key: str = "row_id") -> Applied:
    """Commit ``rows`` (the derived rows of the changed keys, the target's columns) to ``target``
    in one Delta commit. See the module docstring for the two forms."""
    from pyspark.sql import functions as F

    ref = parse_table_ref(target)
    spark = rows.sparkSession
    columns = rows.columns
    view = f"_sparktune_changes_{abs(hash((ref.raw, id(rows))))}"
    if changes.inserted is not None:
        statement = f"INSERT INTO {ref.sql} ({', '.join(columns)}) SELECT {', '.join(columns)} FROM {view}"
        rows.createOrReplaceTempView(view)
    else:
        markers = changes.keys.select(F.col(key).alias(_KEY), *[F.lit(None).cast(rows.schema[c].dataType).alias(c)
                                                                for c in columns])
        source = rows.select(F.lit(None).cast("string").alias(_KEY), *columns).unionByName(markers)
        source.createOrReplaceTempView(view)
        statement = (f"MERGE INTO {ref.sql} AS t USING {view} AS s ON t.{key} = s.{_KEY} "
                     f"WHEN MATCHED THEN DELETE "
                     f"WHEN NOT MATCHED AND s.{_KEY} IS NULL THEN INSERT ({', '.join(columns)}) "
                     f"VALUES ({', '.join('s.' + c for c in columns)})")
    try:
        with commit_metadata(spark, user_metadata):
            spark.sql(statement)
    finally:
        spark.catalog.dropTempView(view)
    version, metrics = _last_commit(spark, ref)[::2]
    return Applied(version, metrics.get("numTargetRowsInserted", metrics.get("numOutputRows", 0)),
                   metrics.get("numTargetRowsDeleted", 0))


def last_provenance(spark, target) -> tuple[dict | None, dict]:
    """(the provenance a stage recorded in the target's latest commit, or None when that commit
    carries none, e.g. someone else's DELETE; that commit's operation metrics)."""
    return _last_commit(spark, parse_table_ref(target))[1:]


def _last_commit(spark, ref) -> tuple[int, dict | None, dict]:
    """(version, parsed userMetadata or None, numeric operation metrics) of the latest commit."""
    commit = last_commit(spark, ref)
    metrics = {k: int(v) for k, v in commit["operationMetrics"].items() if str(v).isdigit()}
    try:
        written = json.loads(commit["userMetadata"] or "null")
    except ValueError:
        written = None
    return commit["version"], (written if isinstance(written, dict) else None), metrics
