"""TABLE references: a Delta table on disk (a path or URI) or a catalog name, as on Databricks.

``a/b``, ``./raw``, ``/tmp/raw``, ``dbfs:/x``, ``s3://b/x`` are paths; ``raw``, ``db.raw`` and
``catalog.db.raw`` are names resolved by the session's catalog (Unity Catalog on Databricks).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from sparktune.errors import SparktuneError
from sparktune.tasks import TOKENIZED

__all__ = [
    "Commit",
    "FileLayout",
    "TableRef",
    "TableSnapshot",
    "check_writes",
    "commit_metadata",
    "commits",
    "data_files",
    "file_layout",
    "last_commit",
    "parse_table_ref",
    "read_snapshot",
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
    return last_commit(spark, ref)["version"]


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


def last_commit(spark, ref, version: int | None = None) -> dict:
    """``version``, ``operation``, ``userMetadata`` and ``operationMetrics`` of the table's latest
    commit (or of the commit of ``version``; ``{}`` when the history no longer holds it)."""
    ref = parse_table_ref(ref)
    _require_exists(spark, ref, "table")
    return _commit(spark, ref, version)


def _commit(spark, ref: TableRef, version: int | None) -> dict:
    """``last_commit`` of a table known to exist (the one place that reads a commit). The latest
    commit of a local path table comes from its log through delta-rs (milliseconds, where
    ``DESCRIBE HISTORY`` runs a Spark job: ~0.2 s per call, two per incremental build), as
    ``read_snapshot`` does (``_log_is_local``); anything else, and any failure there, through Spark SQL."""
    if version is None and _log_is_local(spark, ref):
        try:
            return _commit_from_log(ref)
        except Exception:  # noqa: BLE001  (Spark SQL below reads it, or says what is wrong)
            pass
    history = spark.sql(f"DESCRIBE HISTORY {ref.sql}" + (" LIMIT 1" if version is None else ""))
    rows = (history if version is None else history.where(f"version = {int(version)}")).collect()
    if not rows:
        return {}
    row = rows[0]
    return {"version": int(row["version"]), "operation": row["operation"], "userMetadata": row["userMetadata"],
            "operationMetrics": dict(row["operationMetrics"] or {})}


def _os_path(path: str) -> str:
    """A local path (a table's folder, a data file) as delta-rs and the OS open it: ``file:`` (any
    number of slashes) dropped."""
    return "/" + path[len("file:"):].lstrip("/") if path.startswith("file:") else path


def _commit_from_log(ref: TableRef) -> dict:
    """``_commit``'s latest commit from the Delta log (the same commitInfo DESCRIBE HISTORY shows)."""
    from deltalake import DeltaTable

    assert ref.path is not None  # _log_is_local: a path table
    (info,) = DeltaTable(_os_path(ref.path)).history(1)
    return {"version": int(info["version"]), "operation": info.get("operation"),
            "userMetadata": info.get("userMetadata"),
            "operationMetrics": {str(k): str(v) for k, v in (info.get("operationMetrics") or {}).items()}}


@dataclass(frozen=True)
class Commit:
    """One commit of a table's history, as ``DESCRIBE HISTORY`` shows it (values as text)."""

    version: int
    operation: str
    parameters: dict[str, str]
    metrics: dict[str, str]


def commits(spark, ref, first: int, last: int) -> list[Commit]:
    """The commits ``first..last`` the table's history still holds, oldest first (a version the
    log no longer has is missing from the list). From the Delta log for a local path table
    (``_log_is_local``), else, and on any failure there, ``DESCRIBE HISTORY``."""
    ref = parse_table_ref(ref)
    if _log_is_local(spark, ref):
        try:
            return _commits_from_log(ref, first, last)
        except Exception:  # noqa: BLE001  (Spark SQL below reads it, or says what is wrong)
            pass
    rows = (spark.sql(f"DESCRIBE HISTORY {ref.sql}").where(f"version >= {int(first)} AND version <= {int(last)}")
            .select("version", "operation", "operationParameters", "operationMetrics").collect())
    return sorted((_commit_of(r.asDict()) for r in rows), key=lambda c: c.version)


def _commit_of(info: Mapping) -> Commit:
    def text(values) -> dict[str, str]:
        return {str(k): str(v) for k, v in dict(values or {}).items()}

    return Commit(int(info["version"]), str(info.get("operation")), text(info.get("operationParameters")),
                  text(info.get("operationMetrics")))


@dataclass(frozen=True)
class FileLayout:
    """Which data files make up a table at one version, and what decides how they are read."""

    files: frozenset[str]
    """The data files' absolute paths (URIs for remote storage), as Spark and delta-rs open them."""
    partition_columns: tuple[str, ...]
    column_mapping: str
    """``delta.columnMapping.mode`` (``none`` when unset)."""


def file_layout(spark, ref, version: int) -> FileLayout:
    """The table's ``FileLayout`` at ``version``: from the Delta log for a local path table
    (``_log_is_local``: milliseconds, where Spark builds the version's file list with a job), else,
    and on any failure there, ``inputFiles()`` and ``DESCRIBE DETAIL`` (the latest layout)."""
    ref = parse_table_ref(ref)
    if _log_is_local(spark, ref):
        try:
            return _file_layout_from_log(ref, version)
        except Exception:  # noqa: BLE001  (Spark below reads it, or says what is wrong)
            pass
    detail = _detail(spark, ref)
    return FileLayout(_files_through_spark(spark, ref, version), tuple(detail["partitionColumns"] or ()),
                      str(dict(detail["properties"] or {}).get("delta.columnMapping.mode", "none")))


def data_files(spark, ref, version: int) -> frozenset[str]:
    """``file_layout(...).files`` alone: through Spark, no ``DESCRIBE DETAIL`` for a layout not needed."""
    ref = parse_table_ref(ref)
    if _log_is_local(spark, ref):
        try:
            return _file_layout_from_log(ref, version).files
        except Exception:  # noqa: BLE001  (Spark below reads it, or says what is wrong)
            pass
    return _files_through_spark(spark, ref, version)


def _files_through_spark(spark, ref: TableRef, version: int) -> frozenset[str]:
    # One form for either reader (Spark gives file: URIs), so that the files of two versions
    # compare even when only one of them had to fall back here.
    return frozenset(_os_path(f) for f in read_table(spark, ref, version=version, what="table").inputFiles())


def _commits_from_log(ref: TableRef, first: int, last: int) -> list[Commit]:
    from deltalake import DeltaTable

    assert ref.path is not None  # _log_is_local: a path table
    found = [_commit_of(info) for info in DeltaTable(_os_path(ref.path)).history()]
    return sorted((c for c in found if first <= c.version <= last), key=lambda c: c.version)


def _file_layout_from_log(ref: TableRef, version: int) -> FileLayout:
    from deltalake import DeltaTable

    assert ref.path is not None  # _log_is_local: a path table
    table = DeltaTable(_os_path(ref.path), version=int(version))
    metadata = table.metadata()
    # delta-rs gives the files percent-encoded ("a%20b"); the OS, Spark and ``inputFiles()`` use the
    # real names. (It cannot open a table whose folder name holds a "%XX" itself: it decodes twice;
    # that raises here and Spark answers instead.)
    files = frozenset(_os_path(unquote(f)) for f in table.file_uris())
    return FileLayout(files, tuple(metadata.partition_columns),
                      str((metadata.configuration or {}).get("delta.columnMapping.mode", "none")))


def _sql_str(value) -> str:
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


# ---------------------------------------------------------------------------------------------
# The table snapshot: one type, one reader.


@dataclass(frozen=True)
class TableSnapshot:
    """One Delta table at one version: what a stage pins, records and hands to training ranks.

    ``table``: the TABLE as given. ``location``: where its files are, as delta-rs and training
    ranks open them (``file:`` dropped). ``uri``: what provenance records, usable from any machine
    and session: a catalog table's full name, else the location as Spark qualifies it (``file:/...``,
    ``dbfs:/...``, ``abfss://...``), never a relative path. ``table_id``: Delta's id of the table
    as it is now (at any ``version``): a new one each time the table is created anew (deleted,
    then written) or replaced (``CREATE OR REPLACE``), so (id, version) names one content for
    good. ``properties``: the table properties at ``version``.
    ``name``: the catalog name, None for a path table.
    """

    table: str
    location: str
    uri: str
    table_id: str
    version: int
    properties: Mapping[str, str] = field(default_factory=dict, hash=False)
    name: str | None = None

    def to_dict(self) -> dict:
        return {"table": self.table, "location": self.location, "uri": self.uri, "table_id": self.table_id,
                "version": self.version, "properties": dict(self.properties), "name": self.name}

    @classmethod
    def from_dict(cls, data: Mapping) -> TableSnapshot:
        return cls(table=str(data["table"]), location=str(data["location"]), uri=str(data["uri"]),
                   table_id=str(data["table_id"]), version=int(data["version"]),
                   properties=dict(data.get("properties") or {}), name=data.get("name"))


def read_snapshot(spark, ref, version: int | None = None, what: str = "table") -> TableSnapshot:
    """The table ``ref`` at ``version`` (None: its latest), read one way.

    With a session, Spark SQL only: ``DESCRIBE DETAIL`` (id, name, location, properties) and
    ``DESCRIBE HISTORY`` (versions). It is the one reader that works wherever a stage runs: a
    local session, a cluster, Spark Connect (the client has no JVM and often cannot open the
    table's files) and Databricks (catalog names; storage credentials only the cluster holds).
    Not ``SHOW TBLPROPERTIES``: it redacts values matching ``spark.redaction.regex`` ("token").
    Properties at a version older than the latest are the latest ones when no later commit
    changed them, else replayed from the history's CREATE/REPLACE/SET/UNSET TBLPROPERTIES commits.

    ``spark=None`` is for a process without a session (a training rank under plain torchrun, a
    write check before Spark starts): the same snapshot from the Delta log, with delta-rs, for a
    path only. delta-rs also answers for the latest version of a path table on a classic session
    with a local master (``_log_is_local``): the driver reads the same files as its executors, and
    the log costs milliseconds where Spark's first ``DESCRIBE DETAIL`` took seconds (the snapshot
    state built by a Spark job); any failure there falls back to Spark SQL, which reports it.

    Never partial, never swallowed: a missing table or version is a SparktuneError that names
    ``what`` and says what to do; any other failure propagates.
    """
    ref = parse_table_ref(ref)
    if spark is None:
        return _snapshot_from_log(ref, version, what)
    if version is None and _log_is_local(spark, ref):
        try:
            return _snapshot_from_log(ref, None, what)
        except Exception:  # noqa: BLE001  (Spark SQL below reads it, or says what is wrong)
            pass
    return _snapshot_through_spark(spark, ref, version, what)


def _log_is_local(spark, ref: TableRef) -> bool:
    """A path table on this machine's disk, read by a classic session with a local master (not on
    Databricks, where storage credentials and Unity Catalog belong to the cluster)."""
    from sparktune.databricks import on_databricks
    from sparktune.spark import is_connect, is_local_master, spark_master

    if ref.path is None or on_databricks() or (_URI.match(ref.path) and not ref.path.startswith("file:")):
        return False
    if not os.path.isdir(os.path.join(_os_path(ref.path), "_delta_log")) or is_connect(spark):
        return False
    return is_local_master(spark_master(spark))


def _snapshot_through_spark(spark, ref: TableRef, version: int | None, what: str) -> TableSnapshot:
    """``read_snapshot`` by Spark SQL: ``DESCRIBE DETAIL`` and ``DESCRIBE HISTORY``."""
    _require_exists(spark, ref, what)
    detail = _detail(spark, ref)
    properties = dict(detail["properties"] or {})
    if version is None:
        version = int(_commit(spark, ref, None)["version"])
    else:
        properties = _properties_at(spark, ref, int(version), properties, what)
    location = str(detail["location"])
    name = str(detail["name"]) if not ref.is_path and detail["name"] else None
    return TableSnapshot(table=ref.raw, location=location[len("file:"):] if location.startswith("file:") else location,
                         uri=name or location, table_id=str(detail["id"]), version=int(version),
                         properties=properties, name=name)


def _detail(spark, ref: TableRef):
    """The ``DESCRIBE DETAIL`` row of an existing table (the one place that runs it)."""
    return spark.sql(f"DESCRIBE DETAIL {ref.sql}").first()


# Commits that change no table property (Spark's and delta-rs' operation names).
_DATA_ONLY = frozenset({"WRITE", "STREAMING UPDATE", "DELETE", "UPDATE", "MERGE", "OPTIMIZE", "VACUUM START",
                        "VACUUM END", "TRUNCATE", "FSCK", "COMPUTE STATS", "REORG"})


def _properties_at(spark, ref: TableRef, version: int, latest: dict, what: str) -> dict:
    """The properties at ``version`` (``latest``: the latest's), from the table's history."""
    rows = sorted(spark.sql(f"DESCRIBE HISTORY {ref.sql}").select("version", "operation", "operationParameters")
                  .collect(), key=lambda r: int(r["version"]))
    if not any(int(r["version"]) == version for r in rows):
        known = f"{int(rows[0]['version'])}..{int(rows[-1]['version'])}" if rows else "none"
        raise SparktuneError(f"{what}: table {ref.raw!r} has no version {version} (versions in its history: "
                             f"{known}); leave the version empty for the latest")
    if all(r["operation"] in _DATA_ONLY for r in rows if int(r["version"]) > version):
        return latest
    props: dict | None = None
    for row in (r for r in rows if int(r["version"]) <= version):
        operation, params = str(row["operation"]), dict(row["operationParameters"] or {})
        if operation in _DATA_ONLY:
            continue
        if "CREATE" in operation or "REPLACE" in operation:
            props = _created_props(params)
        elif operation == "SET TBLPROPERTIES" and props is not None:
            props.update(_json_props(params.get("properties")))
        elif operation == "UNSET TBLPROPERTIES" and props is not None:
            for key in json.loads(params.get("properties") or "[]"):
                props.pop(key, None)
        else:
            props = None  # a change this reader cannot replay: unknown from here on
    if props is None:
        raise SparktuneError(
            f"{what}: the properties of table {ref.raw!r} at version {version} cannot be read: they changed after "
            "it, and its history no longer shows how they were at that version; use the latest version")
    return props


def _created_props(params: dict) -> dict | None:
    """All properties a CREATE/REPLACE commit set: Spark records them as ``properties``, delta-rs
    as the ``metadata`` action's ``configuration``; None when neither says."""
    if "properties" in params:
        return _json_props(params["properties"])
    if "metadata" in params:
        return {str(k): str(v) for k, v in (json.loads(params["metadata"] or "{}").get("configuration") or {}).items()}
    return None


def _json_props(text) -> dict:
    return {str(k): str(v) for k, v in (json.loads(text) if text else {}).items()}


def _snapshot_from_log(ref: TableRef, version: int | None, what: str) -> TableSnapshot:
    """``read_snapshot`` without a session: the Delta log of a path table, read with delta-rs."""
    if ref.path is None:
        raise SparktuneError(f"{what}: {ref.raw!r} is a catalog name, which only Spark can resolve; run with a Spark "
                             "session (`sparktune train` resolves it) or give the table's folder")
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    location = _os_path(ref.path)
    try:
        table = DeltaTable(location)
    except TableNotFoundError:
        raise SparktuneError(f"{what}: no Delta table at {ref.raw!r}; create it first (e.g. with `sparktune "
                             "tokenize`) or check the path") from None
    table_id = str(table.metadata().id)  # the current id, as DESCRIBE DETAIL reports it
    if version is not None and version != table.version():
        try:
            table.load_as_version(version)
        except Exception as exc:  # delta-rs raises plain exceptions for a missing version; the rest propagate
            if "version" in str(exc).lower():
                raise SparktuneError(f"{what}: table {ref.raw!r} has no version {version} ({exc}); leave the "
                                     "version empty for the latest") from None
            raise
    uri = location if _URI.match(location) else "file:" + location
    return TableSnapshot(table=ref.raw, location=location, uri=uri, table_id=table_id, version=int(table.version()),
                         properties=dict(table.metadata().configuration or {}))


def table_version(spark, ref) -> int:
    """The table's latest version (``read_snapshot(spark, ref).version``)."""
    return read_snapshot(spark, ref).version


def table_id(spark, ref) -> str:
    """The Delta table's id (``read_snapshot(spark, ref).table_id``)."""
    return read_snapshot(spark, ref).table_id


def table_properties(spark, ref) -> dict:
    """The table's properties at its latest version (``read_snapshot(spark, ref).properties``)."""
    return dict(read_snapshot(spark, ref).properties)


def table_uri(spark, ref) -> str:
    """The table as provenance records it (``read_snapshot(spark, ref).uri``)."""
    return read_snapshot(spark, ref).uri


def table_location(spark, ref) -> str:
    """Where the table's files are (``read_snapshot(spark, ref).location``); a path needs no query."""
    ref = parse_table_ref(ref)
    return ref.path if ref.path is not None else read_snapshot(spark, ref).location


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
        return _normal(str(_detail(spark, ref)["location"]))
    except Exception:  # a view or a table the session cannot describe: compared by name only
        return None


def _writer_kind(spark, ref: TableRef, location: str | None) -> str | None:
    """Which kind of sparktune stage wrote the existing table (None: not sparktune's, or no table)."""
    props: dict = {}
    try:
        if ref.is_path and location and not _URI.match(location):
            if not os.path.isdir(os.path.join(location, "_delta_log")):
                return None
            props = dict(read_snapshot(None, location).properties)  # no query, and works before Spark starts
        elif spark is not None and table_exists(spark, ref):
            props = dict(read_snapshot(spark, ref).properties)
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
    # Long (~80 lines) on purpose: every refusal rule in one place, in the order a user's mistake is found.
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
