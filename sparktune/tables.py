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
from sparktune.tasks import TOKENIZED

__all__ = [
    "TableRef",
    "check_writes",
    "commit_metadata",
    "last_commit",
    "parse_table_ref",
    "read_table",
    "spark_path",
    "table_exists",
    "table_id",
    "table_location",
    "table_properties",
    "table_uri",
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
    """``version``, ``operation``, ``userMetadata`` and ``operationMetrics`` of the table's latest commit."""
    ref = parse_table_ref(ref)
    _require_exists(spark, ref, "table")
    row = spark.sql(f"DESCRIBE HISTORY {ref.sql} LIMIT 1").collect()[0]
    return {"version": int(row["version"]), "operation": row["operation"], "userMetadata": row["userMetadata"],
            "operationMetrics": dict(row["operationMetrics"] or {})}


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
    # ("token" among them), which hides e.g. a source path with "tokens" in it.
    return dict(spark.sql(f"DESCRIBE DETAIL {ref.sql}").collect()[0]["properties"] or {})


def table_uri(spark, ref) -> str:
    """The table as provenance records it, usable from any machine and session: a catalog table's
    full name (``catalog.schema.table``), a path table's location as Spark qualifies it (a URI
    with its scheme: ``file:/...``, ``dbfs:/...``, ``abfss://...``), never a relative path."""
    ref = parse_table_ref(ref)
    _require_exists(spark, ref, "table")
    row = spark.sql(f"DESCRIBE DETAIL {ref.sql}").collect()[0]
    if not ref.is_path and row["name"]:
        return str(row["name"])
    return str(row["location"])


def table_location(spark, ref) -> str:
    """Where the table's files are: what delta-rs (``deltalake``) opens without a JVM."""
    ref = parse_table_ref(ref)
    if ref.is_path:
        return ref.path
    _require_exists(spark, ref, "table")
    location = spark.sql(f"DESCRIBE DETAIL {ref.sql}").collect()[0]["location"]
    return location[len("file:"):] if location.startswith("file:") else location


# ---------------------------------------------------------------------------------------------
# Where a stage may write: one owner for "never overwrite an input or another stage's table".

# Hadoop reads these as glob syntax in a path handed to spark.read; a backslash makes them literal.
_GLOB_CHARS = re.compile(r"([\\{}\[\]*?])")

# How each stage's tables are recognised by their properties, and which stage "kind" may replace them.
# The stage (or the ``sparktune.stage`` property it writes) -> the kind of table it owns. A tokenized
# table says ``TOKENIZED.stage_name`` (not "tokenize": Spark's SHOW TBLPROPERTIES redacts "token").
_STAGE_KIND = {"ingest": "ingest", "tokenize": "tokenize", TOKENIZED.stage_name: "tokenize",
               "evaluate": "predictions", "predict": "predictions", "openai-score": "predictions"}


def spark_path(path: str) -> str:
    """``path`` as a literal for ``spark.read``: ``[v1]``, ``{a,b}``, ``*`` and ``?`` are not globs."""
    return _GLOB_CHARS.sub(r"\\\1", path)


def _normal(path: str) -> str:
    """A comparable form of a location: ``file:`` dropped, local paths resolved (symlinks, ``..``)."""
    text = str(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif text.startswith("file:"):
        text = text[len("file:"):]
    if _URI.match(text):
        return text.rstrip("/")
    return os.path.realpath(os.path.abspath(os.path.expanduser(text)))


def _inside(inner: str, outer: str) -> bool:
    """True when ``inner`` is ``outer`` or lies under it."""
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _resolved(spark, ref: TableRef) -> str | None:
    """The table's location, comparable across paths and catalog names; None for a name not (yet) in the catalog."""
    if ref.is_path:
        assert ref.path is not None
        return _normal(ref.path)
    if spark is None:
        return None
    try:
        if not spark.catalog.tableExists(ref.name):
            return None
        return _normal(spark.sql(f"DESCRIBE DETAIL {ref.sql}").collect()[0]["location"])
    except Exception:  # a view or a table the session cannot describe: compared by name only
        return None


def _writer_kind(spark, ref: TableRef, location: str | None) -> str | None:
    """Which kind of sparktune stage wrote the existing table (None: not sparktune's, or no table)."""
    props: dict = {}
    try:
        if ref.is_path and location and not _URI.match(location):
            if not os.path.isdir(os.path.join(location, "_delta_log")):
                return None
            from deltalake import DeltaTable

            props = dict(DeltaTable(location).metadata().configuration)
        elif spark is not None and table_exists(spark, ref):
            props = table_properties(spark, ref)
        else:
            return None
    except Exception:  # an unreadable log is reported by the stage's own read, with its message
        return None
    stage = props.get(TOKENIZED.prop_stage)
    if stage:
        return _STAGE_KIND.get(stage, stage)
    if "sparktune.model_uri" in props or "sparktune.model" in props:
        return "predictions"
    return None


def check_writes(spark, stage: str, *, tables: dict | None = None, folders: dict | None = None,
                 inputs: dict | None = None) -> None:
    """Refuse, before any work, a write that would destroy data: call it first thing in a stage.

    ``tables``/``folders``: ``{flag: target}`` the stage writes (Delta tables it replaces; folders it
    writes files into); ``inputs``: ``{flag: table}`` it reads. Locations are compared resolved
    (catalog names by their location, paths absolute with symlinks followed, ``file:`` dropped).
    Refused: a table written onto an input, inside one or around one (VACUUM of the outer table
    would delete the inner one's files); a folder written onto or inside an input table; two
    outputs at the same place; a table folder holding files but no Delta log; a path that is a
    file where a folder is written; a table that another stage wrote (``sparktune.stage``: e.g.
    tokenize's output onto a raw table). ``spark`` may be None (before Spark starts): names are
    then compared by name only.
    """
    targets: list[tuple[str, str, str | None, str, TableRef | None]] = []  # (flag, raw, location, kind, ref)
    for flag, target in (tables or {}).items():
        if target is None or target == "":
            continue
        ref = parse_table_ref(target)
        targets.append((flag, ref.raw, _resolved(spark, ref), "table", ref))
    for flag, folder in (folders or {}).items():
        if folder:
            targets.append((flag, str(folder), _normal(str(folder)), "folder", None))
    sources: list[tuple[str, str, str | None, str | None]] = []  # (flag, raw, location, name)
    for flag, source in (inputs or {}).items():
        if not source:
            continue
        try:
            ref = parse_table_ref(source)
        except SparktuneError:
            continue  # not a table reference (e.g. a file source): the stage checks it itself
        sources.append((flag, ref.raw, _resolved(spark, ref), None if ref.is_path else _name_key(ref.name)))

    def shown(raw: str) -> str:
        from sparktune.redact import redact

        return repr(redact(raw))

    for i, (flag, raw, location, kind, target_ref) in enumerate(targets):
        name = _name_key(target_ref.name) if target_ref is not None and not target_ref.is_path else None
        for in_flag, in_raw, in_location, in_name in sources:
            same = (name is not None and name == in_name) or (
                location is not None and in_location is not None and location == in_location)
            if same:
                raise SparktuneError(
                    f"{stage} {flag} {shown(raw)} is the {in_flag} table {shown(in_raw)}: writing there would "
                    f"replace the data this stage reads. Give {flag} a new path or table name")
            if location is not None and in_location is not None:
                if _inside(location, in_location):
                    raise SparktuneError(
                        f"{stage} {flag} {shown(raw)} lies inside the {in_flag} table {shown(in_raw)}: files written "
                        f"there mix with the table's own (and VACUUM deletes them). Give {flag} a path outside it")
                if kind == "table" and _inside(in_location, location):
                    raise SparktuneError(
                        f"{stage} {flag} {shown(raw)} is a folder around the {in_flag} table {shown(in_raw)}: a table "
                        f"there would own (and VACUUM would delete) the input's files. Give {flag} another path")
        for other_flag, other_raw, other_location, other_kind, _ in targets[:i]:
            if "table" in (kind, other_kind) and location is not None and other_location is not None and (
                    _inside(location, other_location) or _inside(other_location, location)):
                raise SparktuneError(f"{stage} {flag} {shown(raw)} and {other_flag} {shown(other_raw)} are the same "
                                     "place or one holds the other; give them separate paths")
        if location is None or _URI.match(location):
            if kind == "table" and target_ref is not None:
                _check_writer(spark, stage, flag, target_ref, location, shown)
            continue
        if os.path.isfile(location):
            raise SparktuneError(f"{stage} {flag} {shown(raw)} is an existing file, not a folder: give a folder path "
                                 "(it is created when missing)")
        existing = location
        while not os.path.exists(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        if os.path.isdir(existing) and not os.access(existing, os.W_OK | os.X_OK):
            raise SparktuneError(f"{stage} {flag} {shown(raw)}: this user may not write in {shown(existing)}; choose "
                                 "a folder you may write, or fix its permissions")
        if kind == "folder":
            continue
        if os.path.isdir(location) and os.listdir(location) and not os.path.isdir(os.path.join(location, "_delta_log")):
            raise SparktuneError(
                f"{stage} {flag} {shown(raw)} is a folder that holds files but no Delta table; refusing to write a "
                "table over it: give a new path or a Delta table's")
        assert target_ref is not None
        _check_writer(spark, stage, flag, target_ref, location, shown)


def _check_writer(spark, stage: str, flag: str, ref: TableRef, location: str | None, shown) -> None:
    writer = _writer_kind(spark, ref, location)
    mine = _STAGE_KIND.get(stage, stage)
    if writer is not None and writer != mine:
        raise SparktuneError(
            f"{stage} {flag} {shown(ref.raw)} holds a table written by `sparktune {writer}`: replacing it would lose "
            f"that stage's data. Give {flag} a new path or table name (or drop that table first if it is unwanted)")


def _name_key(name: str | None) -> str | None:
    return None if name is None else name.replace("`", "").lower()
