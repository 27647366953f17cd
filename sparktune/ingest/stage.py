"""Stage 1: a text corpus (files, a folder, a Hugging Face dataset or a table) -> a raw Delta table.

Every input record ends in exactly one of two tables: the raw table (valid rows, with a stable
``row_id``) or the quarantine table (the original record and the exact ``reason`` it was
rejected). The records of the source are counted without Spark's parsers (lines of a JSONL
file, records of a CSV file by Python's ``csv`` module, files of an aclImdb folder, Parquet row
counts from the file footers, Delta row counts from the log) and ingest refuses to write
unless ``source records == raw rows + quarantined rows``; after writing, the row counts of
the two commits are checked against it again.

Raw columns: ``row_id`` (string; a hash of split, label and text, so re-runs give the same ids
and exact duplicates share one), ``split``, ``text``, ``label`` (int, -1 for unlabelled), then
whatever else the source carried (e.g. IMDB's ``id`` and ``rating``, ``source_file``). Every raw
row has a non-null, non-blank split, a text that is not blank and a label in
``-1..num_labels-1``. Source columns whose names Delta cannot store (spaces, punctuation) or
that clash with these are left out of the raw table (they stay in quarantined records) and
listed in the result; nested source columns are stored as JSON strings.

Record rules, the same for every source kind:

- "blank" means made only of whitespace (any Unicode White_Space: tabs, newlines, no-break
  and ideographic spaces), control or format characters (NUL, zero-width space, BOM). Labels
  and splits are trimmed of those; texts are kept byte for byte.
- A label is an integer (``1``, ``-1``, an integral float such as ``1.0`` that pandas writes
  for a column with missing values) or a name (pos/neg/positive/negative/unsup). ``NaN``,
  ``1.5``, booleans, lists and objects are not. A missing label is allowed only in an
  unlabelled split (unsupervised/unsup/unlabelled), where it becomes -1.
- A source's own ``split`` column is kept (also in split-files mode, where the file name is
  only the default); a null or blank split is rejected.
- JSONL: one record per line (lines end at LF, CR or CRLF). A blank line, a line that is not
  JSON or a JSON value that is not an object is one quarantined record.
- CSV: the first record is the header; quoted fields may span lines. A record that breaks
  the quoting rules (an unbalanced quote) is split back into its lines, each read on its own,
  so that a stray quote cannot swallow the records after it: the line with the stray quote
  is quarantined and its neighbours are kept.
- aclImdb: one record per ``train|test/pos|neg|unsup/*.txt`` file; a file not named
  ``<id>_<rating>.txt`` is quarantined.
- Files whose names start with ``_`` or ``.`` are not records (Spark's file listing skips
  them too).

Two commits, quarantine first. Both carry the run's id (``sparktune.run_id`` in the table
properties and in the commit's userMetadata) and the raw table's properties name the
quarantine version written with it (``sparktune.quarantine_version``). Between the two
commits a reader of the raw table still sees the previous run, consistent with itself; a
reader of the quarantine sees the new run's rejects. To read a matching pair, read the raw
table and time-travel the quarantine to ``sparktune.quarantine_version``. If the raw write
fails, the quarantine holds a commit whose run id no raw version names.

The raw table is created with Delta's change data feed on (``delta.enableChangeDataFeed =
true``; ``--no-change-data-feed`` writes ``false``): later stages that bring a derived table
forward (incremental tokenize and predict, ``sparktune.incremental``) then read only the rows that
changed. Appends write no extra files for it; an UPDATE, DELETE or MERGE on the raw table also
writes the changed rows' old and new values (Delta's ``_change_data`` files). Without the feed,
appends are still found from the Delta log, other changes by comparing the two versions in
full. The quarantine table is replaced by each run and never read incrementally: no feed.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from sparktune.errors import SparktuneError
from sparktune.ingest.frame import Loaded, ReadOptions
from sparktune.ingest.readers import read_source
from sparktune.ingest.result import IngestResult, default_quarantine_ref
from sparktune.ingest.sources import FORMATS, Source, SourceKind, detect_source
from sparktune.ingest.validate import mark_duplicates, validate
from sparktune.redact import redact, redact_column
from sparktune.settings import Stage, add_stage, option
from sparktune.tables import TableRef, check_writes, last_commit, parse_table_ref, table_uri, write_table

__all__ = ["IngestSettings", "add_cli", "ingest", "ingest_stage"]

_COLUMN_ARG = re.compile(r"^[\w .-]+$")


def ingest(
    spark,
    source: str,
    output: str,
    quarantine: str | None = None,
    fmt: str = "auto",
    text_column: str = "text",
    label_column: str = "label",
    split: str | None = None,
    num_labels: int = 2,
    change_data_feed: bool = True,
) -> IngestResult:
    """Read ``source``, validate every record, write the quarantine then the raw Delta table.

    The session's configuration is left as found: readers pass what they need as reader
    options, and the commits' userMetadata is set only around each write (``write_table``).
    ``change_data_feed``: the raw table's ``delta.enableChangeDataFeed`` (see the module docstring).
    """
    if num_labels < 1:
        raise SparktuneError(f"--num-labels must be at least 1, found {num_labels}")
    for arg, column in (("--text-column", text_column), ("--label-column", label_column)):
        if not _COLUMN_ARG.match(column or ""):
            raise SparktuneError(f"{arg} {column!r}: expected a column name of letters, digits, '_', '-', '.' or "
                                 "spaces")
    quarantine = quarantine or default_quarantine_ref(output)
    targets = _Targets(source, output, quarantine, parse_table_ref(output), parse_table_ref(quarantine))
    found = detect_source(source, fmt)
    _check_targets(spark, targets, found)
    loaded = read_source(spark, found, ReadOptions(text_column, label_column, split, fmt))
    tagged = mark_duplicates(validate(loaded.df, num_labels, loaded.extras))
    return _write(spark, tagged, loaded, found, targets, change_data_feed)


_CHANGE_DATA_FEED = "delta.enableChangeDataFeed"


@dataclass(frozen=True)
class _Targets:
    source: str
    output: str
    quarantine: str
    output_ref: TableRef
    quarantine_ref: TableRef


def _check_targets(spark, targets: _Targets, found: Source) -> None:
    """Everything that can be checked before the first write, so a bad argument writes nothing."""
    check_writes(spark, "ingest", tables={"--output": targets.output_ref, "--quarantine": targets.quarantine_ref},
                 inputs={"--source": found.location} if found.kind is not SourceKind.HF else None)
    for what, ref in (("--output", targets.output_ref), ("--quarantine", targets.quarantine_ref)):
        if ref.name is not None and "." in ref.name:
            schema = ref.name.rsplit(".", 1)[0].replace("`", "")
            if not spark.catalog.databaseExists(schema):
                raise SparktuneError(f"{what} {ref.raw!r}: the schema {schema!r} does not exist; create it first")


def _check_count(tagged, loaded: Loaded, source: str) -> dict:
    """Rows per ``reason_kind`` (None: valid); refuses unless they add up to the source's own count."""
    counts = {r["reason_kind"]: r["count"] for r in tagged.groupBy("reason_kind").count().collect()}
    raw_rows = counts.get(None, 0)
    quarantined_rows = sum(v for k, v in counts.items() if k is not None)
    expected = loaded.count.records
    if raw_rows + quarantined_rows != expected:
        raise SparktuneError(
            f"--source {redact(source)}: the source has {expected:,} records ({loaded.count.method}) but "
            f"{raw_rows + quarantined_rows:,} were read ({raw_rows:,} valid, {quarantined_rows:,} rejected); "
            "nothing was written. Records were lost or multiplied while reading: check the file's format "
            "(--format) and encoding, and report it if the file is well formed."
        )
    return counts


def _provenance(spark, loaded: Loaded, found: Source, source: str, run_id: str) -> dict:
    # Provenance that reads from anywhere: a table's full name or URI, a file's absolute path.
    if found.kind in (SourceKind.DELTA, SourceKind.TABLE):
        shown = table_uri(spark, found.location)
    else:
        shown = source if found.kind is SourceKind.HF else found.location
    return {
        "sparktune.stage": "ingest",
        "sparktune.run_id": run_id,
        "sparktune.source": redact(shown),
        "sparktune.source_kind": found.kind.value,
        "sparktune.source_records": str(loaded.count.records),
        **loaded.pinned,
    }


def _split_frames(tagged, extras: list, source_shown: str):
    """``(raw, rejected)``: the valid rows in the raw table's shape, the rest in the quarantine's."""
    from pyspark.sql import functions as F

    has_file = "source_file" in tagged.columns
    source_file = redact_column(F.col("source_file")) if has_file else F.lit(None).cast("string")
    raw = tagged.where(F.col("reason").isNull()).select(
        "row_id", "split", "text", "label", *[c for c in extras if c in tagged.columns],
        *([source_file.alias("source_file")] if has_file else []),
    )
    rejected = tagged.where(F.col("reason").isNotNull()).select(
        "reason", redact_column(F.col("record")).alias("record"), "split", F.lit(source_shown).alias("source"),
        source_file.alias("source_file"), F.current_timestamp().alias("ingested_at"),
    )
    return raw, rejected


def _write(spark, tagged, loaded: Loaded, found: Source, targets: _Targets, change_data_feed: bool) -> IngestResult:
    """Count, then commit the quarantine and the raw table (in that order), then check the commits."""
    from pyspark import StorageLevel

    tagged = tagged.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = _check_count(tagged, loaded, targets.source)
        raw_rows = counts.pop(None, 0)
        quarantined_rows = sum(counts.values())
        run_id = uuid.uuid4().hex
        provenance = _provenance(spark, loaded, found, targets.source, run_id)
        raw, rejected = _split_frames(tagged, loaded.extras, provenance["sparktune.source"])
        quarantine_version = write_table(rejected, targets.quarantine_ref, properties=provenance,
                                         user_metadata=provenance)
        raw_props = {**provenance, "sparktune.quarantine": redact(table_uri(spark, targets.quarantine_ref)),
                     "sparktune.quarantine_version": str(quarantine_version)}
        output_version = write_table(raw, targets.output_ref, user_metadata=raw_props,
                                     properties={**raw_props, _CHANGE_DATA_FEED: str(change_data_feed).lower()})
    finally:
        tagged.unpersist()

    written = (
        _committed_rows(spark, targets.output_ref, output_version),
        _committed_rows(spark, targets.quarantine_ref, quarantine_version),
    )
    if None not in written and written != (raw_rows, quarantined_rows):
        raise SparktuneError(
            f"the commits wrote {written[0]:,} raw and {written[1]:,} quarantined rows, but {raw_rows:,} and "
            f"{quarantined_rows:,} were expected (run {run_id}); the tables may have been changed concurrently"
        )
    return IngestResult(
        output=targets.output,
        quarantine=targets.quarantine,
        input_rows=loaded.count.records,
        raw_rows=raw_rows,
        quarantined_rows=quarantined_rows,
        output_version=output_version,
        quarantine_version=quarantine_version,
        reasons=dict(sorted(counts.items())),
        run_id=run_id,
        count_method=loaded.count.method,
        dropped_columns=loaded.dropped,
    )


def _committed_rows(spark, ref, version: int) -> int | None:
    metrics = last_commit(spark, parse_table_ref(ref), version).get("operationMetrics")
    if not metrics or "numOutputRows" not in metrics:
        return None
    return int(metrics["numOutputRows"])


@dataclass(frozen=True, kw_only=True)
class IngestSettings:
    """``sparktune ingest``'s flags and the pipeline's ``ingest`` section."""

    source: str
    """What to read: a file, a folder of split files, an aclImdb/ folder, a Delta path, hf:NAME or a table name."""
    output: str
    """Raw TABLE to write (a path or a catalog name)."""
    quarantine: str = ""
    """TABLE for rejected rows; empty: OUTPUT_quarantine."""
    format: str = option("auto", choices=FORMATS)
    """The source's format; auto: from the source (its files' extensions, a _delta_log, aclImdb's layout)."""
    text_column: str = "text"
    """The source's column holding the text."""
    label_column: str = "label"
    """The source's column holding the label."""
    split: str = ""
    """Split name for sources without one; empty: from the file name, else train."""
    num_labels: int = 2
    """Labels must be in 0..num_labels-1 (or -1 for unlabelled)."""
    change_data_feed: bool = True
    """Create the raw table with Delta's change data feed on (delta.enableChangeDataFeed), so
    incremental tokenize and predict read only the changed rows; off: they find appends from the
    Delta log and other changes by comparing versions in full."""

    def __post_init__(self):
        from sparktune.config import raise_if, require

        problems: list = []
        require(problems, self.num_labels >= 1, "num_labels", f"must be at least 1, found {self.num_labels}")
        require(problems, self.format in FORMATS, "format", f"expected one of {list(FORMATS)}, found {self.format!r}")
        raise_if(problems)


def ingest_stage(spark, settings: IngestSettings, tracker=None) -> IngestResult:
    """The ingest stage: ``sparktune ingest`` and the pipeline's first step (logs nothing to MLflow)."""
    s = settings
    return ingest(spark, s.source, s.output, quarantine=s.quarantine or None, fmt=s.format,
                  text_column=s.text_column, label_column=s.label_column, split=s.split or None,
                  num_labels=s.num_labels, change_data_feed=s.change_data_feed)


def add_cli(subparsers) -> None:
    add_stage(subparsers, Stage("ingest", IngestSettings, ingest_stage,
                                help="read a corpus into a raw Delta table, quarantining bad rows",
                                description=__doc__))
