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
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum

from sparktune.errors import SparktuneError, bounded
from sparktune.redact import redact, redact_column
from sparktune.results import StageResult
from sparktune.tables import (
    TableRef,
    check_writes,
    last_commit,
    parse_table_ref,
    read_snapshot,
    read_table,
    spark_path,
    table_exists,
    table_uri,
    write_table,
)

__all__ = [
    "LABEL_NAMES",
    "UNLABELLED_SPLITS",
    "IngestResult",
    "Reason",
    "SourceCount",
    "count_source_records",
    "csv_records",
    "default_quarantine_ref",
    "detect_source",
    "ingest",
    "is_blank",
]

LABEL_NAMES = {"neg": 0, "negative": 0, "pos": 1, "positive": 1, "unsup": -1, "unlabelled": -1, "unlabeled": -1}
UNLABELLED_SPLITS = ("unsupervised", "unsup", "unlabelled", "unlabeled")
KNOWN_SPLITS = ("train", "test", "validation", "valid", "dev", "eval") + UNLABELLED_SPLITS
FILE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json"}
_SEP = "\u001f"
# Java regex (Spark's regexp functions): White_Space, control, format and separator characters.
_BLANK_CLASS = r"[\s\p{Cc}\p{Cf}\p{Z}]"
_BLANK_JAVA = r"(?U)^" + _BLANK_CLASS + r"*$"
_TRIM_JAVA = r"(?U)^" + _BLANK_CLASS + r"+|" + _BLANK_CLASS + r"+$"
# Column names Delta stores without column mapping and Spark resolves without quoting rules.
_SAFE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_COLUMN_ARG = re.compile(r"^[\w .-]+$")
_OUTPUT_COLUMNS = ("row_id", "split", "text", "label")
# Names the raw/quarantine tables or the intermediate frames use: a source column by one of
# these names (any case) is not stored as an extra column.
_RESERVED = frozenset(
    {"row_id", "split", "text", "label", "source_file", "reason", "reason_kind", "record", "source", "ingested_at"}
)
# Longest piece of a bad value quoted back in a reason.
_QUOTE_CHARS = 100
_NOT_UTF8 = re.compile(r"[\udc80-\udcff]")  # bytes decoded with surrogateescape
_NOT_UTF8_REASON = ("not valid UTF-8: the record holds bytes that are not UTF-8 (a Latin-1 or binary file?); "
                    "re-save the source as UTF-8")


class Reason(str, Enum):
    """Why a record was quarantined: the ``reason`` column starts with one of these."""

    UNPARSEABLE = "unparseable record"
    BLANK_RECORD = "empty record (blank line)"
    BAD_FILE_NAME = "file name is not <id>_<rating>.txt"
    MISSING_SPLIT = "missing split"
    SPLIT_WRONG_TYPE = "split has the wrong type"
    TEXT_WRONG_TYPE = "text has the wrong type"
    MISSING_TEXT = "missing text"
    EMPTY_TEXT = "empty text (blank or whitespace only)"
    LABEL_WRONG_TYPE = "label has the wrong type"
    MISSING_LABEL = "missing label"
    LABEL_OUT_OF_RANGE = "label out of range"
    DUPLICATE = "exact duplicate"
    NOT_UTF8 = "not valid UTF-8"
    REPEATED_KEY = "repeated key"


def is_blank(text: str) -> bool:
    """Python's reading of the blank rule (tests use it as an oracle; Spark uses ``_BLANK_JAVA``)."""
    import unicodedata

    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp") for c in text)


@dataclass
class SourceCount:
    """Records in the source, counted without Spark's parsers."""

    records: int
    method: str
    files: list = field(default_factory=list)


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


def detect_source(source: str, fmt: str = "auto") -> tuple[str, str]:
    """Return ``(kind, location)``: kind is aclimdb, split-files, file, folder, delta, hf or table."""
    if fmt not in ("auto", "parquet", "csv", "json", "aclimdb", "hf", "table", "delta"):
        raise SparktuneError(f"--format {fmt!r} is not known: use auto, parquet, csv, json, aclimdb, delta, hf or "
                             "table")
    if source.startswith("hf:") or fmt == "hf":
        return "hf", source.removeprefix("hf:")
    if fmt == "table":
        return "table", source
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.isdir(path):
        if fmt == "delta" or os.path.isdir(os.path.join(path, "_delta_log")):
            return "delta", path
        if fmt == "aclimdb" or _is_aclimdb(path):
            return "aclimdb", path
        if _split_files(path):
            return "split-files", path
        return "folder", path
    if os.path.isfile(path):
        return "file", path
    if "/" not in source and parse_table_ref(source).name:
        return "table", source
    raise SparktuneError(
        f"--source {redact(source)!r}: no such file or folder. Expected a Parquet/CSV/JSONL file or folder, an aclImdb "
        "folder, a Delta table path, 'hf:<dataset name>' or a table name."
    )


def _is_aclimdb(path: str) -> bool:
    return any(
        os.path.isdir(os.path.join(path, split, label)) for split in ("train", "test") for label in ("pos", "neg")
    )


def _visible(name: str) -> bool:
    return not name.startswith((".", "_"))


def _split_files(path: str) -> list[str]:
    return sorted(
        f for f in os.listdir(path)
        if os.path.splitext(f)[1].lower() in FILE_FORMATS and _visible(f) and os.path.isfile(os.path.join(path, f))
    )


def _file_format(path: str, fmt: str) -> str:
    if fmt in ("parquet", "csv", "json"):
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_FORMATS:
        raise SparktuneError(
            f"{redact(path)}: cannot tell the format from the extension {ext!r}; expected one of "
            f"{', '.join(FILE_FORMATS)}, or pass --format parquet|csv|json"
        )
    return FILE_FORMATS[ext]


def _aclimdb_files(location: str) -> list[str]:
    files = []
    for split in ("train", "test"):
        for label in ("pos", "neg", "unsup"):
            folder = os.path.join(location, split, label)
            if os.path.isdir(folder):
                files += [
                    os.path.join(folder, f) for f in sorted(os.listdir(folder))
                    if f.endswith(".txt") and _visible(f) and os.path.isfile(os.path.join(folder, f))
                ]
    return files


# ---------------------------------------------------------------------------------------------
# CSV records by Python's csv module, with recovery from broken quoting.


def _lines(handle) -> Iterator[str]:
    # newline='' handles split lines at LF, CR and CRLF and keep the endings: the same line
    # ends as Hadoop's line reader, and the record's original text stays intact.
    yield from handle


def csv_records(lines: Iterable[str]) -> Iterator[tuple[int, str, list | None, str | None]]:
    """``(first line number, original text, fields or None, problem or None)`` per CSV record.

    Quoted fields may span lines. When a record breaks the quoting rules (Python's strict
    reader raises), each of its lines is read again on its own: a stray quote then costs only
    its own line, never the records after it.
    """
    csv.field_size_limit(2**31 - 1)
    consumed: list = []
    counter = [0]

    def feed():
        for line in lines:
            counter[0] += 1
            consumed.append((counter[0], line))
            yield line

    reader = csv.reader(feed(), strict=True)
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            bad = list(consumed)
            consumed.clear()
            if len(bad) == 1:
                number, line = bad[0]
                yield number, line.rstrip("\r\n"), None, f"line {number}: {exc} (an unbalanced quote?)"
                continue
            for number, line in bad:
                yield _csv_single_line(number, line)
            continue
        got = list(consumed)
        consumed.clear()
        first = got[0][0] if got else counter[0]
        yield first, "".join(line for _, line in got).rstrip("\r\n"), fields, None


def _csv_single_line(number: int, line: str) -> tuple[int, str, list | None, str | None]:
    try:
        rows = list(csv.reader([line], strict=True))
    except csv.Error as exc:
        return number, line.rstrip("\r\n"), None, f"line {number}: {exc} (an unbalanced quote?)"
    return number, line.rstrip("\r\n"), rows[0] if rows else [], None


def _open_text(path: str):
    return open(path, encoding="utf-8-sig", errors="replace", newline="")


def _csv_header(path: str) -> list:
    with _open_text(path) as handle:
        for _, _, fields, _ in csv_records(_lines(handle)):
            return fields or []
    return []


def _parse_csv_file(path: str, text: str) -> Iterator[dict]:
    """One dict per data record of one CSV file (the header is not a record)."""
    text = text.removeprefix("\ufeff")
    header: list | None = None
    for number, original, fields, problem in csv_records(io.StringIO(text, newline="")):
        if header is None:
            header = fields if fields else []
            continue
        row = {"source_file": path, "_line": number, "_record": original, "_fields": None, "_problem": None}
        if _NOT_UTF8.search(original):
            row["_record"] = original.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            row["_problem"] = _NOT_UTF8_REASON
        elif problem is not None:
            row["_problem"] = f"{Reason.UNPARSEABLE.value}: {problem}"
        elif not header:
            row["_problem"] = f"{Reason.UNPARSEABLE.value}: the file's first record (its header) is empty or malformed"
        elif not fields:  # [] (None comes only with a problem, handled above)
            row["_problem"] = Reason.BLANK_RECORD.value
        elif len(fields) > len(header):
            row["_problem"] = (
                f"{Reason.UNPARSEABLE.value}: line {number} has {len(fields)} fields, the header has {len(header)}"
            )
        else:
            # Spark's CSV reader (and most tools) read an empty field as null.
            row["_fields"] = json.dumps({name: (value if value != "" else None) for name, value in zip(header, fields)})
        yield row


def _csv_partition(batches):
    import pandas as pd

    columns = ["source_file", "_line", "_record", "_fields", "_problem"]
    for batch in batches:
        for path, data in zip(batch["source_file"], batch["value"]):
            rows: list = []
            # surrogateescape keeps each invalid byte as one lone surrogate: found per record below.
            text = bytes(data or b"").decode("utf-8", errors="surrogateescape")
            for row in _parse_csv_file(path, text):
                rows.append(row)
                if len(rows) >= 4096:
                    yield pd.DataFrame(rows, columns=columns)
                    rows = []
            if rows:
                yield pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------------------------
# Counting the source without Spark.


def _count_lines(path: str) -> int:
    with open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="latin-1", newline="") as handle:
        return sum(1 for _ in handle)


def _count_csv(path: str) -> int:
    with _open_text(path) as handle:
        records = sum(1 for _ in csv_records(_lines(handle)))
    return max(records - 1, 0)  # the header


def _count_parquet(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _count_file(path: str, fmt: str) -> int:
    return {"json": _count_lines, "csv": _count_csv, "parquet": _count_parquet}[fmt](path)


def _count_delta(location: str, version: int) -> int:
    from deltalake import DeltaTable

    table = DeltaTable(location, version=version)
    actions = table.get_add_actions(flatten=True)
    import pyarrow as pa

    actions = pa.table(actions) if not isinstance(actions, pa.Table) else actions
    names = actions.column_names
    has_dv = "deletionVector.storageType" in names and actions.column("deletionVector.storageType").null_count < len(
        actions
    )
    if "num_records" in names and actions.column("num_records").null_count == 0 and not has_dv:
        return int(sum(actions.column("num_records").to_pylist()))
    return table.to_pyarrow_dataset().count_rows()


def count_source_records(files_by_format: dict) -> SourceCount:
    """Count the records of ``{format: [files]}`` with Python/pyarrow alone."""
    total = 0
    methods = []
    for fmt, files in files_by_format.items():
        total += sum(_count_file(f, fmt) for f in files)
        methods.append({"json": "lines", "csv": "csv records (Python csv)", "parquet": "Parquet footers"}[fmt])
    return SourceCount(total, ", ".join(methods) or "no files", [f for fs in files_by_format.values() for f in fs])


# ---------------------------------------------------------------------------------------------
# Loading: every kind becomes the same normalised frame.
#
# _record (the original record, for the quarantine), _problem (a structural reason or null),
# _split/_text/_label (strings, may be null), _split_type/_text_type/_label_type (null when the
# source value had an acceptable type, else the type found), then the extra source columns.


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _sql_str(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


@dataclass
class _Loaded:
    df: object
    count: SourceCount
    extras: list
    dropped: list
    pinned: dict = field(default_factory=dict)


def _keep_extras(names: Iterable[str], used: Iterable[str]) -> tuple[list, list]:
    """(extra columns to store, source columns left out); ``used`` are the text/label/split columns."""
    used_lower = {n.lower() for n in used}
    taken = set(_RESERVED) | used_lower
    keep, dropped = [], []
    for name in names:
        lower = name.lower()
        if _SAFE_NAME.match(name) and not name.startswith("_") and lower not in taken:
            keep.append(name)
            taken.add(lower)
        elif lower not in used_lower and lower not in (*_OUTPUT_COLUMNS, "source_file"):
            dropped.append(name)
    return keep, dropped


def _typed(df, text_column: str, label_column: str, default_split, extra_names=None):
    """Normalise a frame with real column types (Parquet, Delta, a table, a HF dataset)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    names = [c for c in df.columns if c != "source_file"]
    problems = []
    for arg, column in (("--text-column", text_column), ("--label-column", label_column)):
        if column not in df.columns:
            problems.append(f"the column {column!r} is missing (found columns: {', '.join(map(redact, names))}); "
                            f"pass {arg}")
    if problems:
        raise SparktuneError("; ".join(problems))
    types = {f.name: f.dataType for f in df.schema.fields}

    def type_problem(name, accept):
        kind = types[name]
        return F.lit(None).cast("string") if isinstance(kind, accept) else F.lit(kind.simpleString())

    # Binary columns are text as far as ingest cares: cast to string (same bytes) and checked
    # row by row for valid UTF-8 in _validate.
    strings = (T.StringType, T.VarcharType, T.CharType, T.BinaryType)
    scalars = strings + (T.NumericType, T.BooleanType)
    has_split = "split" in types
    record = F.to_json(F.struct(*[F.col(_quote(c)) for c in names]))
    columns = [
        record.alias("_record"),
        F.lit(None).cast("string").alias("_problem"),
        (F.col("split").cast("string") if has_split else F.lit(default_split)).alias("_split"),
        (type_problem("split", strings) if has_split else F.lit(None).cast("string")).alias("_split_type"),
        F.col(_quote(text_column)).cast("string").alias("_text"),
        type_problem(text_column, strings).alias("_text_type"),
        F.col(_quote(label_column)).cast("string").alias("_label"),
        type_problem(label_column, scalars).alias("_label_type"),
    ]
    if "source_file" in df.columns:
        columns.append(F.col("source_file"))
    keep, dropped = _keep_extras(extra_names if extra_names is not None else names,
                                 [text_column, label_column, "split"])
    for name in keep:
        kind = types[name]
        value = F.col(_quote(name))
        if isinstance(kind, T.StructType | T.ArrayType | T.MapType):
            value = F.to_json(value)
        columns.append(value.alias(name))
    return df.select(*columns), keep, dropped


def _json_frame(spark, files: list, text_column: str, label_column: str, default_split: str | None):
    """JSONL read as text lines and parsed per line: no line can be dropped or multiplied."""
    from pyspark.sql import functions as F

    lines = spark.read.text([spark_path(f) for f in files]).select(
        F.col("value"), F.col("_metadata.file_path").alias("source_file"))
    parsed = lines.select("value", "source_file", F.expr("try_parse_json(value)").alias("_v"))
    parsed = parsed.withColumn("_vtype", F.expr("schema_of_variant(_v)"))
    keys = [
        r["k"]
        for r in lines.select(F.explode(F.expr("json_object_keys(value)")).alias("k"))
        .distinct()
        .limit(10_000)
        .collect()
    ]
    objects_seen = bool(keys) or parsed.where(F.col("_vtype").startswith("OBJECT")).limit(1).count() > 0
    problems = []
    for arg, column in (("--text-column", text_column), ("--label-column", label_column)):
        if objects_seen and column not in keys:
            problems.append(f"no JSON record has the key {column!r} (found keys: "
                            f"{', '.join(map(redact, sorted(keys)[:50]))}); "
                            f"pass {arg}")
    if problems:
        raise SparktuneError("; ".join(problems))

    def get(name, kind):
        return F.expr(f"try_variant_get(_v, '$[\\'{_sql_str(name)}\\']', '{kind}')")

    def vtype(name):
        return F.expr(f"schema_of_variant(variant_get(_v, '$[\\'{_sql_str(name)}\\']'))")

    def not_string(name):
        t = vtype(name)
        return F.when(t.isNull() | t.isin("STRING", "VOID"), F.lit(None).cast("string")).otherwise(t)

    def not_scalar(name):
        t = vtype(name)
        return F.when(
            t.isNull() | ~(t.startswith("OBJECT") | t.startswith("ARRAY")), F.lit(None).cast("string")
        ).otherwise(t)

    # try_parse_json refuses an object with a repeated key (Spark's variant keeps one value per
    # key); json_object_keys (Jackson) accepts it and lists every key: such a line is valid JSON
    # whose meaning is ambiguous, so it is quarantined as a repeated key rather than guessed.
    top_keys = F.expr("json_object_keys(value)")
    repeated = F.expr("array_distinct(filter(json_object_keys(value), k -> "
                      "size(filter(json_object_keys(value), j -> j = k)) > 1))")
    problem = (
        F.when(~F.expr("is_valid_utf8(value)"), F.lit(_NOT_UTF8_REASON))
        .when(F.col("value").rlike(_BLANK_JAVA), F.lit(Reason.BLANK_RECORD.value))
        .when(F.col("_v").isNull() & (F.size(repeated) > 0),
              F.concat(F.lit(Reason.REPEATED_KEY.value + ": the object repeats "),
                       F.substring(F.array_join(repeated, ", "), 1, _QUOTE_CHARS),
                       F.lit(" (which value is meant is ambiguous; keep one)")))
        .when(F.col("_v").isNull() & top_keys.isNotNull(),
              F.lit(Reason.REPEATED_KEY.value + " inside a nested object (or an object too large to parse)"))
        .when(F.col("_v").isNull(), F.lit(f"{Reason.UNPARSEABLE.value}: the line is not valid JSON"))
        .when(
            ~F.coalesce(F.col("_vtype").startswith("OBJECT"), F.lit(False)),
            F.concat(
                F.lit(f"{Reason.UNPARSEABLE.value}: the line is a JSON "), F.col("_vtype"), F.lit(", not an object")
            ),
        )
    )
    has_split = "split" in keys
    columns = [
        F.col("value").alias("_record"),
        problem.alias("_problem"),
        (get("split", "string") if has_split else F.lit(default_split)).alias("_split"),
        (not_string("split") if has_split else F.lit(None).cast("string")).alias("_split_type"),
        get(text_column, "string").alias("_text"),
        not_string(text_column).alias("_text_type"),
        get(label_column, "string").alias("_label"),
        not_scalar(label_column).alias("_label_type"),
        F.col("source_file"),
    ]
    keep, dropped = _keep_extras(keys, [text_column, label_column, "split"])
    for name in keep:
        t = vtype(name)
        as_json = F.expr(f"to_json(variant_get(_v, '$[\\'{_sql_str(name)}\\']'))")
        columns.append(
            F.when(t.isNull() | (t == "VOID"), F.lit(None).cast("string"))
            .when(t == "STRING", get(name, "string"))
            .otherwise(as_json)
            .alias(name)
        )
    return parsed.select(*columns), keep, dropped


def _csv_frame(spark, files: list, text_column: str, label_column: str, default_split: str | None):
    """CSV parsed by Python's csv module in the executors, one file per task."""
    from pyspark.sql import functions as F

    headers = {path: _csv_header(path) for path in files}
    names: list = []
    for header in headers.values():
        names += [n for n in header if n not in names]
    if any(headers.values()):
        problems = []
        for path, header in headers.items():
            twice = sorted({n for n in header if header.count(n) > 1})
            if twice:
                problems.append(f"{redact(path)}: the CSV header repeats the column(s) {bounded(twice)}; which "
                                "field is meant is ambiguous: give each column its own name")
        for arg, column in (("--text-column", text_column), ("--label-column", label_column)):
            if column not in names:
                problems.append(f"the CSV header has no column {column!r} (found: {', '.join(map(redact, names))}); "
                                f"pass {arg}")
        if problems:
            raise SparktuneError("; ".join(problems))
    # The bytes go to Python, which decides per record whether they are UTF-8.
    whole = spark.read.text([spark_path(f) for f in files], wholetext=True).select(
        F.col("_metadata.file_path").alias("source_file"), F.col("value").cast("binary").alias("value"))
    parsed = whole.mapInPandas(
        _csv_partition, "source_file string, _line long, _record string, _fields string, _problem string"
    ).withColumn("_m", F.from_json("_fields", "map<string,string>"))
    has_split = "split" in names
    columns = [
        F.col("_record"),
        F.col("_problem"),
        (F.col("_m")["split"] if has_split else F.lit(default_split)).alias("_split"),
        F.lit(None).cast("string").alias("_split_type"),
        F.col("_m")[text_column].alias("_text"),
        F.lit(None).cast("string").alias("_text_type"),
        F.col("_m")[label_column].alias("_label"),
        F.lit(None).cast("string").alias("_label_type"),
        F.col("source_file"),
    ]
    keep, dropped = _keep_extras(names, [text_column, label_column, "split"])
    columns += [F.col("_m")[name].alias(name) for name in keep]
    return parsed.select(*columns), keep, dropped


def _files_frame(spark, files: list, fmt: str, text_column, label_column, default_split):
    from pyspark.sql import functions as F

    if fmt == "json":
        return _json_frame(spark, files, text_column, label_column, default_split)
    if fmt == "csv":
        return _csv_frame(spark, files, text_column, label_column, default_split)
    try:
        df = spark.read.option("mergeSchema", "true").parquet(*[spark_path(f) for f in files])
    except Exception as exc:  # AnalysisException: the files' schemas conflict
        raise SparktuneError(
            f"the Parquet files cannot be read as one table ({type(exc).__name__}: "
            f"{redact(str(exc).splitlines()[0])[:300]}); "
            "give files with compatible column types"
        ) from None
    df = df.withColumn("source_file", F.col("_metadata.file_path"))
    return _typed(df, text_column, label_column, default_split)


def _aclimdb_frame(spark, location: str, files: list):
    from pyspark.sql import functions as F

    pattern = os.path.join(spark_path(location), "{train,test}", "{pos,neg,unsup}", "*.txt")
    df = spark.read.text(pattern, wholetext=True).select(
        F.col("value").alias("text"), F.col("_metadata.file_path").alias("source_file")
    )
    parts = F.split(F.col("source_file"), "/")
    n = F.size(parts)
    folder_split = F.element_at(parts, n - 2)
    label_folder = F.element_at(parts, n - 1)
    name = F.element_at(parts, n)
    pattern_ok = r"^([0-9]+)_([0-9]+)\.txt$"
    good_name = name.rlike(pattern_ok)

    def as_long(group: int):
        return F.regexp_extract(name, pattern_ok, group).try_cast("bigint")

    columns = [
        F.to_json(F.struct("source_file", F.substring("text", 1, 10_000).alias("text"))).alias("_record"),
        F.when(~good_name, F.concat(F.lit(Reason.BAD_FILE_NAME.value + ": found "), name)).alias("_problem"),
        F.when(label_folder == "unsup", F.lit("unsupervised")).otherwise(folder_split).alias("_split"),
        F.lit(None).cast("string").alias("_split_type"),
        F.col("text").alias("_text"),
        F.lit(None).cast("string").alias("_text_type"),
        label_folder.alias("_label"),
        F.lit(None).cast("string").alias("_label_type"),
        F.col("source_file"),
        as_long(1).alias("id"),
        as_long(2).alias("rating"),
    ]
    count = SourceCount(len(files), "files of the aclImdb folder", files)
    return _Loaded(df.select(*columns), count, ["id", "rating"], [])


def _load(spark, kind: str, location: str, fmt: str, split: str | None, text_column: str, label_column: str) -> _Loaded:
    """The source as the normalised frame, with its independent record count."""
    if kind == "aclimdb":
        return _aclimdb_frame(spark, location, _aclimdb_files(location))
    if kind in ("split-files", "file", "folder"):
        if kind == "split-files":
            groups = [([os.path.join(location, n)], _file_format(os.path.join(location, n), fmt),
                       os.path.splitext(n)[0]) for n in _split_files(location)]
        elif kind == "file":
            stem = os.path.splitext(os.path.basename(location))[0].lower()
            default = split or (stem if stem in KNOWN_SPLITS else "train")
            groups = [([location], _file_format(location, fmt), default)]
        else:
            files = sorted(
                f for f in glob.glob(os.path.join(glob.escape(location), "*"))
                if os.path.isfile(f) and _visible(os.path.basename(f))
                and (fmt in ("parquet", "csv", "json") or os.path.splitext(f)[1].lower() in FILE_FORMATS)
            )
            if not files:
                raise SparktuneError(f"--source {redact(location)}: the folder holds no .parquet, .csv or .jsonl files")
            by_format: dict = {}
            for f in files:
                by_format.setdefault(_file_format(f, fmt), []).append(f)
            groups = [(fs, f, split or "train") for f, fs in by_format.items()]
        frames, keeps, dropped = [], [], []
        counts: dict[str, list] = {}
        for files, file_fmt, default_split in groups:
            frame, keep, drop = _files_frame(spark, files, file_fmt, text_column, label_column, default_split)
            frames.append(frame)
            keeps += [k for k in keep if k not in keeps]
            dropped += [d for d in drop if d not in dropped]
            counts.setdefault(file_fmt, []).extend(files)
        df = _union(frames)
        return _Loaded(df, count_source_records(counts), keeps, dropped)
    if kind in ("delta", "table"):
        if kind == "table" and not table_exists(spark, location):
            raise SparktuneError(f"--source {redact(location)!r}: no such table in the session's catalog")
        snapshot = read_snapshot(spark, location, what="--source")
        version = snapshot.version
        try:
            records: int | None = _count_delta(snapshot.location, version)
            method = "Delta log row counts (deltalake)"
        except Exception:  # a store deltalake cannot open without credentials: Spark counts instead
            records = None
            method = "Spark count (deltalake could not open the table)"
        df = read_table(spark, location, version=version, what="--source")
        if records is None:
            records = df.count()
        frame, keep, dropped = _typed(df, text_column, label_column, split or "train")
        pinned = {"sparktune.source_version": str(version), "sparktune.source_table_id": snapshot.table_id}
        return _Loaded(frame, SourceCount(records, method), keep, dropped, pinned)
    if kind == "hf":
        df, records = _load_hf(spark, location)
        frame, keep, dropped = _typed(df, text_column, label_column, split or "train")
        return _Loaded(frame, SourceCount(records, "rows of the Hugging Face dataset"), keep, dropped)
    raise AssertionError(kind)


def _union(frames):
    result = frames[0]
    for frame in frames[1:]:
        result = result.unionByName(frame, allowMissingColumns=True)
    return result


def _load_hf(spark, name: str):
    """Real ``datasets.load_dataset`` loading; offline it fails with how to use a local copy."""
    import pandas as pd

    try:
        import datasets

        dataset = datasets.load_dataset(name)
    except Exception as exc:  # the hub raises many kinds: connection, offline mode, not found
        raise SparktuneError(
            f"could not load the Hugging Face dataset {redact(name)!r} ({type(exc).__name__}: "
            f"{redact(str(exc).splitlines()[0])[:200]}). "
            "Without the hub, point --source at a local copy instead: a folder of split files such as "
            "../shared/data/imdb (train.parquet, test.parquet, ...), an aclImdb/ folder, or a Parquet/CSV/JSONL file."
        ) from None
    frames = []
    for split_name, split_data in dataset.items():
        pdf = split_data.to_pandas()
        if "split" not in pdf.columns:
            pdf["split"] = split_name
        frames.append(pdf)
    records = sum(len(f) for f in frames)
    return spark.createDataFrame(pd.concat(frames, ignore_index=True)), records


# ---------------------------------------------------------------------------------------------
# Validation.


def _validate(df, num_labels: int, extras: list):
    """Tag each record with ``reason`` (null when valid) and ``reason_kind``; normalise split/label."""
    from pyspark.sql import functions as F

    def trim(column):
        return F.regexp_replace(column, _TRIM_JAVA, "")

    def quoted(column):
        return F.substring(column, 1, _QUOTE_CHARS)

    split = trim(F.col("_split"))
    split_missing = F.coalesce(split.isNull() | (split == ""), F.lit(True))
    text = F.col("_text")
    label = trim(F.col("_label"))
    label_missing = F.coalesce(label.isNull() | (label == ""), F.lit(True))
    unlabelled = F.coalesce(F.lower(split).isin(*UNLABELLED_SPLITS), F.lit(False))
    int_part = F.regexp_extract(label, r"^([+-]?[0-9]+)(\.0*)?$", 1)
    looks_integral = F.coalesce(int_part != "", F.lit(False))
    as_long = F.nullif(int_part, F.lit("")).try_cast("bigint")
    as_double = label.try_cast("double")
    double_integral = F.coalesce(
        ~F.isnan(as_double) & ((as_double % F.lit(1.0)) == 0) & (F.abs(as_double) < F.lit(1e15)), F.lit(False)
    )
    mapping = F.create_map(*[x for k, v in LABEL_NAMES.items() for x in (F.lit(k), F.lit(v))])
    named = F.element_at(mapping, F.lower(label))
    value = (
        F.when(looks_integral, as_long)
        .when(double_integral, as_double.try_cast("bigint"))
        .otherwise(named.cast("bigint"))
    )
    expected_label = f"expected an integer in -1..{num_labels - 1} or pos/neg/positive/negative, found "
    # Every string that reaches the raw table must be valid UTF-8 (Spark strings may hold any bytes:
    # a Latin-1 file read as text keeps them, and tokenize, polars or DuckDB then fail on the row).
    from pyspark.sql import types as T

    texts = ["_split", "_text", "_label"] + [f.name for f in df.schema.fields
                                              if f.name in extras and isinstance(f.dataType, T.StringType)]
    not_utf8 = F.lit(False)
    for name in texts:
        not_utf8 = not_utf8 | F.coalesce(~F.expr(f"is_valid_utf8({_quote(name)})"), F.lit(False))
    checks = [
        (F.col("_problem").isNotNull(), F.col("_problem")),
        (not_utf8, F.lit(_NOT_UTF8_REASON)),
        (split_missing, F.lit(Reason.MISSING_SPLIT.value)),
        (F.col("_split_type").isNotNull(),
         F.concat(F.lit(Reason.SPLIT_WRONG_TYPE.value + ": expected a string, found "), F.col("_split_type"))),
        (F.col("_text_type").isNotNull(),
         F.concat(F.lit(Reason.TEXT_WRONG_TYPE.value + ": expected a string, found "), F.col("_text_type"))),
        (text.isNull(), F.lit(Reason.MISSING_TEXT.value)),
        (F.coalesce(text.rlike(_BLANK_JAVA), F.lit(False)), F.lit(Reason.EMPTY_TEXT.value)),
        (F.col("_label_type").isNotNull(),
         F.concat(F.lit(Reason.LABEL_WRONG_TYPE.value + ": " + expected_label), quoted(F.col("_label_type")))),
        (label_missing & ~unlabelled, F.lit(Reason.MISSING_LABEL.value)),
        (label_missing, F.lit(None).cast("string")),  # unlabelled split: -1
        (looks_integral & as_long.isNull(),
         F.concat(F.lit(Reason.LABEL_OUT_OF_RANGE.value + ": " + expected_label), quoted(label))),
        (value.isNull(), F.concat(F.lit(Reason.LABEL_WRONG_TYPE.value + ": " + expected_label), quoted(label))),
        (F.coalesce((value < -1) | (value >= num_labels), F.lit(True)),
         F.concat(F.lit(Reason.LABEL_OUT_OF_RANGE.value + ": " + expected_label), quoted(label))),
    ]
    reason = F.when(*checks[0])
    for condition, message in checks[1:]:
        reason = reason.when(condition, message)
    out_label = F.when(label_missing & unlabelled, F.lit(-1)).otherwise(
        F.when(F.coalesce((value >= -1) & (value < num_labels), F.lit(False)), value)
    ).cast("int")
    tagged = df.select(
        reason.alias("reason"),
        # The quarantined record as found, except bytes that are not UTF-8 (shown as U+FFFD).
        F.expr("make_valid_utf8(_record)").alias("record"),
        split.alias("split"),
        text.alias("text"),
        out_label.alias("label"),
        *[F.col(c) for c in df.columns if c in extras or c == "source_file"],
    )
    # Whatever the chain above says, a kept row has a split, a text and a label.
    tagged = tagged.withColumn(
        "reason",
        F.when(
            F.col("reason").isNull() & (F.col("split").isNull() | F.col("text").isNull() | F.col("label").isNull()),
            F.lit("null split, text or label (no rule above caught it)"),
        ).otherwise(F.col("reason")),
    )
    kinds = [r.value for r in Reason]
    kind = F.lit(None).cast("string")
    for k in sorted(kinds, key=len):  # longest prefix wins: "label ..." reasons share no prefix with others
        kind = F.when(F.col("reason").startswith(k), F.lit(k)).otherwise(kind)
    return tagged.withColumn(
        "reason_kind", F.when(F.col("reason").isNotNull(), F.coalesce(kind, F.lit("other"))).otherwise(F.lit(None))
    )


# ---------------------------------------------------------------------------------------------
# Writing.


def _check_targets(spark, output: TableRef, quarantine: TableRef, kind: str, location: str) -> None:
    """Everything that can be checked before the first write, so a bad argument writes nothing."""
    check_writes(spark, "ingest", tables={"--output": output, "--quarantine": quarantine},
                 inputs={"--source": location} if kind != "hf" else None)
    for what, ref in (("--output", output), ("--quarantine", quarantine)):
        if ref.name is not None and "." in ref.name:
            schema = ref.name.rsplit(".", 1)[0].replace("`", "")
            if not spark.catalog.databaseExists(schema):
                raise SparktuneError(f"{what} {ref.raw!r}: the schema {schema!r} does not exist; create it first")


def _committed_rows(spark, ref, version: int) -> int | None:
    ref = parse_table_ref(ref)
    metrics = last_commit(spark, ref, version).get("operationMetrics")
    if not metrics or "numOutputRows" not in metrics:
        return None
    return int(metrics["numOutputRows"])


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
) -> IngestResult:
    """Read ``source``, validate every record, write the quarantine then the raw Delta table."""
    from pyspark import StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if num_labels < 1:
        raise SparktuneError(f"--num-labels must be at least 1, found {num_labels}")
    for arg, column in (("--text-column", text_column), ("--label-column", label_column)):
        if not _COLUMN_ARG.match(column or ""):
            raise SparktuneError(f"{arg} {column!r}: expected a column name of letters, digits, '_', '-', '.' or "
                                 "spaces")
    output_ref = parse_table_ref(output)
    quarantine = quarantine or default_quarantine_ref(output)
    quarantine_ref = parse_table_ref(quarantine)
    kind, location = detect_source(source, fmt)
    _check_targets(spark, output_ref, quarantine_ref, kind, location)

    loaded = _load(spark, kind, location, fmt, split, text_column, label_column)
    tagged = _validate(loaded.df, num_labels, loaded.extras)
    row_id = F.substring(F.sha2(F.concat_ws(_SEP, "split", F.col("label").cast("string"), "text"), 256), 1, 16)
    tagged = tagged.withColumn("row_id", F.when(F.col("reason").isNull(), row_id))
    # Exact duplicates (same split, label and text) share a row_id: keep one, quarantine the rest.
    first = Window.partitionBy("row_id").orderBy("record")
    # Computed once into a column: the two updates below must agree on which rows it marks.
    tagged = tagged.withColumn(
        "_duplicate",
        F.coalesce(F.col("reason").isNull() & F.col("row_id").isNotNull() & (F.row_number().over(first) > 1),
                   F.lit(False)),
    )
    tagged = (
        tagged.withColumn(
            "reason",
            F.when(
                F.col("_duplicate"), F.concat(F.lit(Reason.DUPLICATE.value + " of row_id "), F.col("row_id"))
            ).otherwise(F.col("reason")),
        )
        .withColumn(
            "reason_kind",
            F.when(F.col("_duplicate"), F.lit(Reason.DUPLICATE.value)).otherwise(F.col("reason_kind")),
        )
        .drop("_duplicate")
    )
    tagged = tagged.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = {r["reason_kind"]: r["count"] for r in tagged.groupBy("reason_kind").count().collect()}
        raw_rows = counts.pop(None, 0)
        quarantined_rows = sum(counts.values())
        expected = loaded.count.records
        if raw_rows + quarantined_rows != expected:
            raise SparktuneError(
                f"--source {redact(source)}: the source has {expected:,} records ({loaded.count.method}) but "
                f"{raw_rows + quarantined_rows:,} were read ({raw_rows:,} valid, {quarantined_rows:,} rejected); "
                "nothing was written. Records were lost or multiplied while reading: check the file's format "
                "(--format) and encoding, and report it if the file is well formed."
            )
        run_id = uuid.uuid4().hex
        # Provenance that reads from anywhere: a table's full name or URI, a file's absolute path.
        source_shown = redact(table_uri(spark, location) if kind in ("delta", "table")
                              else source if kind == "hf" else location)
        provenance = {
            "sparktune.stage": "ingest",
            "sparktune.run_id": run_id,
            "sparktune.source": source_shown,
            "sparktune.source_kind": kind,
            "sparktune.source_records": str(expected),
            **loaded.pinned,
        }
        extras = [c for c in loaded.extras if c in tagged.columns]
        raw = tagged.where(F.col("reason").isNull()).select(
            "row_id",
            "split",
            "text",
            "label",
            *extras,
            *(
                [redact_column(F.col("source_file")).alias("source_file")]
                if "source_file" in tagged.columns
                else []
            ),
        )
        rejected = tagged.where(F.col("reason").isNotNull()).select(
            "reason", redact_column(F.col("record")).alias("record"), "split", F.lit(source_shown).alias("source"),
            (redact_column(F.col("source_file")) if "source_file" in tagged.columns
             else F.lit(None).cast("string")).alias("source_file"),
            F.current_timestamp().alias("ingested_at"),
        )
        quarantine_version = write_table(rejected, quarantine_ref, properties=provenance, user_metadata=provenance)
        raw_props = {**provenance, "sparktune.quarantine": redact(table_uri(spark, quarantine_ref)),
                     "sparktune.quarantine_version": str(quarantine_version)}
        output_version = write_table(raw, output_ref, properties=raw_props, user_metadata=raw_props)
    finally:
        tagged.unpersist()

    written = (
        _committed_rows(spark, output_ref, output_version),
        _committed_rows(spark, quarantine_ref, quarantine_version),
    )
    if None not in written and written != (raw_rows, quarantined_rows):
        raise SparktuneError(
            f"the commits wrote {written[0]:,} raw and {written[1]:,} quarantined rows, but {raw_rows:,} and "
            f"{quarantined_rows:,} were expected (run {run_id}); the tables may have been changed concurrently"
        )
    return IngestResult(
        output=output,
        quarantine=quarantine,
        input_rows=expected,
        raw_rows=raw_rows,
        quarantined_rows=quarantined_rows,
        output_version=output_version,
        quarantine_version=quarantine_version,
        reasons=dict(sorted(counts.items())),
        run_id=run_id,
        count_method=loaded.count.method,
        dropped_columns=loaded.dropped,
    )


def add_cli(subparsers) -> None:
    from sparktune.cli import stage_parser

    parser = stage_parser(
        subparsers,
        "ingest",
        help="read a corpus into a raw Delta table, quarantining bad rows",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", required=True, help="file, folder, aclImdb/ folder, Delta path, hf:NAME or table "
                                                        "name")
    parser.add_argument("--output", required=True, help="raw TABLE (a path or a catalog name)")
    parser.add_argument("--quarantine", help="TABLE for rejected rows (default: OUTPUT_quarantine)")
    parser.add_argument("--format", default="auto", dest="fmt", help="auto (default), parquet, csv, json, aclimdb, "
                                                                     "delta, hf, table")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--split", help="split name for sources without one (default: the file name, else 'train')")
    parser.add_argument("--num-labels", type=int, default=2, help="labels must be in 0..N-1 (or -1 for unlabelled)")
    parser.set_defaults(func=_run_cli)


def _run_cli(args, ctx) -> IngestResult:
    return ingest(
        ctx.spark(),
        args.source,
        args.output,
        quarantine=args.quarantine,
        fmt=args.fmt,
        text_column=args.text_column,
        label_column=args.label_column,
        split=args.split,
        num_labels=args.num_labels,
    )
