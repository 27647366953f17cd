"""TABLE references: a Delta table on disk (a path or URI) or a catalog name, as on Databricks.

``a/b``, ``./raw``, ``/tmp/raw``, ``dbfs:/x``, ``s3://b/x`` are paths; ``raw``, ``db.raw`` and
``catalog.db.raw`` are names resolved by the session's catalog (Unity Catalog on Databricks).
"""

from __future__ import annotations

import contextlib
import json
import os
import re

from sparktune.errors import SparktuneError

__all__ = [
    "TableRef",
    "commit_metadata",
    "last_commit",
    "parse_table_ref",
    "read_table",
    "table_exists",
    "table_id",
    "table_location",
    "table_properties",
    "table_version",
    "write_table",
]

_NAME = re.compile(r"^`?[A-Za-z_][\w]*`?(\.`?[A-Za-z_][\w]*`?){0,2}$")
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/")


class TableRef:
    """A parsed TABLE argument; ``sql`` is how Spark SQL names it."""

    def __init__(self, raw: str, path: str | None, name: str | None):
        self.raw = raw
        self.path = path
        self.name = name

    @property
    def is_path(self) -> bool:
        return self.path is not None

    @property
    def sql(self) -> str:
        if self.path is not None:
            return "delta.`" + self.path.replace("`", "``") + "`"
        assert self.name is not None  # parse_table_ref sets a path or a name
        return self.name

    def __str__(self) -> str:
        return self.raw

    def __repr__(self) -> str:
        return f"TableRef({self.raw!r})"


def parse_table_ref(ref) -> TableRef:
    if isinstance(ref, TableRef):
        return ref
    raw = str(ref or "").strip()
    if not raw:
        raise SparktuneError("a TABLE is empty: give a Delta table path (e.g. ./data/raw) or a table name (e.g. "
                             "main.imdb.raw)")
    if _URI.match(raw):
        return TableRef(raw, raw, None)
    if "/" in raw or raw.startswith((".", "~")) or os.sep in raw:
        return TableRef(raw, os.path.abspath(os.path.expanduser(raw)), None)
    if _NAME.match(raw):
        return TableRef(raw, None, raw)
    raise SparktuneError(
        f"{raw!r} is neither a path nor a table name: a path contains '/' (write ./{raw} for a folder here), "
        "a name is name, schema.name or catalog.schema.name of letters, digits and '_'"
    )


def table_exists(spark, ref) -> bool:
    ref = parse_table_ref(ref)
    if ref.is_path:
        from sparktune.spark import is_connect

        if is_connect(spark):
            # delta-spark's DeltaTable over Connect needs the Delta Connect server plugin; SQL needs only Delta.
            from pyspark.errors import AnalysisException

            try:
                return spark.sql(f"DESCRIBE DETAIL {ref.sql}").first()["format"] == "delta"
            except AnalysisException:
                return False
        from delta.tables import DeltaTable

        return DeltaTable.isDeltaTable(spark, ref.path)
    return spark.catalog.tableExists(ref.name)


def _require_exists(spark, ref: TableRef, what: str) -> None:
    if not table_exists(spark, ref):
        kind = "Delta table at path" if ref.is_path else "table named"
        raise SparktuneError(f"{what}: no {kind} {ref.raw!r}; create it first (e.g. with `sparktune ingest`) or check "
                             "the name")


def read_table(spark, ref, version: int | None = None, what: str = "input table"):
    """Read a Delta table, optionally at a pinned version (time travel)."""
    ref = parse_table_ref(ref)
    _require_exists(spark, ref, what)
    if version is None:
        return spark.read.table(ref.sql) if not ref.is_path else spark.read.format("delta").load(ref.path)
    return spark.sql(f"SELECT * FROM {ref.sql} VERSION AS OF {int(version)}")


# Delta's optimistic concurrency: another writer committed first and this commit was refused.
_CONCURRENT_ERRORS = (
    "ConcurrentAppendException", "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException",
    "MetadataChangedException", "ProtocolChangedException", "ConcurrentTransactionException",
    "ConcurrentWriteException", "DELTA_CONCURRENT", "DELTA_METADATA_CHANGED", "DELTA_PROTOCOL_CHANGED",
    "TABLE_OR_VIEW_ALREADY_EXISTS", "DELTA_TABLE_ALREADY_EXISTS",
)


def write_table(df, ref, properties: dict | None = None, user_metadata: dict | None = None) -> int:
    """Replace the table's content with ``df`` in one Delta commit; returns the new version.

    ``CREATE OR REPLACE TABLE ... AS SELECT`` keeps the table's history (every run is a new
    version that time travel can read) and sets the properties in the same commit. The
    commit is all or nothing: a writer killed before it leaves the previous version (its
    orphan data files are never referenced, and VACUUM removes them). When another writer
    commits to the same table first, Delta refuses this commit (the second writer never
    mixes its files into the winner's version) and a SparktuneError says so. Property values
    and user metadata are redacted of credentials.
    """
    from sparktune.redact import redact

    ref = parse_table_ref(ref)
    spark = df.sparkSession
    view = f"_sparktune_write_{abs(hash((ref.raw, id(df))))}"
    df.createOrReplaceTempView(view)
    props = ""
    if properties:
        pairs = ", ".join(f"'{_sql_str(k)}' = '{_sql_str(redact(str(v)))}'" for k, v in properties.items())
        props = f" TBLPROPERTIES ({pairs})"
    try:
        with commit_metadata(spark, user_metadata):
            spark.sql(f"CREATE OR REPLACE TABLE {ref.sql} USING DELTA{props} AS SELECT * FROM {view}")
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        if any(marker in text for marker in _CONCURRENT_ERRORS):
            raise SparktuneError(
                f"{redact(ref.raw)}: another writer committed to this table while this run was writing, and Delta "
                f"refused this run's commit ({redact(text.splitlines()[0])[:300]}). Nothing of this run was committed "
                "to it; the table holds the other run's complete version. Rerun when the other writer is done."
            ) from None
        raise
    finally:
        spark.catalog.dropTempView(view)
    return table_version(spark, ref)


@contextlib.contextmanager
def commit_metadata(spark, user_metadata: dict | None):
    """Delta commits made inside carry ``user_metadata`` (redacted JSON) as their ``userMetadata``."""
    from sparktune.redact import redact_mapping

    meta_key = "spark.databricks.delta.commitInfo.userMetadata"
    previous = spark.conf.get(meta_key, None)
    try:
        if user_metadata is not None:
            spark.conf.set(meta_key, json.dumps(redact_mapping(dict(user_metadata)), sort_keys=True))
        yield
    finally:
        if previous is None:
            spark.conf.unset(meta_key)
        else:
            spark.conf.set(meta_key, previous)


def table_id(spark, ref) -> str:
    """The Delta table's id: a new one each time the table is created anew (dropped, deleted)."""
    ref = parse_table_ref(ref)
    _require_exists(spark, ref, "table")
    return str(spark.sql(f"DESCRIBE DETAIL {ref.sql}").collect()[0]["id"])


def last_commit(spark, ref) -> dict:
    """``version``, ``operation`` and ``userMetadata`` of the table's latest commit."""
    ref = parse_table_ref(ref)
    _require_exists(spark, ref, "table")
    row = spark.sql(f"DESCRIBE HISTORY {ref.sql} LIMIT 1").collect()[0]
    return {"version": int(row["version"]), "operation": row["operation"], "userMetadata": row["userMetadata"]}


def _sql_str(value) -> str:
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


def table_version(spark, ref) -> int:
    ref = parse_table_ref(ref)
    _require_exists(spark, ref, "table")
    row = spark.sql(f"DESCRIBE HISTORY {ref.sql} LIMIT 1").collect()[0]
    return int(row["version"])


def table_properties(spark, ref) -> dict:
    ref = parse_table_ref(ref)
    _require_exists(spark, ref, "table")
    # Not SHOW TBLPROPERTIES: it redacts any key or value matching spark.redaction.regex
    # ("token" among them), which hides e.g. sparktune.tokenizer.
    return dict(spark.sql(f"DESCRIBE DETAIL {ref.sql}").collect()[0]["properties"] or {})


def table_location(spark, ref) -> str:
    """Where the table's files are: what delta-rs (``deltalake``) opens without a JVM."""
    ref = parse_table_ref(ref)
    if ref.is_path:
        return ref.path
    _require_exists(spark, ref, "table")
    location = spark.sql(f"DESCRIBE DETAIL {ref.sql}").collect()[0]["location"]
    return location[len("file:"):] if location.startswith("file:") else location
