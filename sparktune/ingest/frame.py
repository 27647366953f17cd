"""The normalised frame every reader returns, with the source's independent record count.

Columns: ``_record`` (the original record, for the quarantine), ``_problem`` (a structural
reason or null), ``_split``/``_text``/``_label`` (strings, may be null),
``_split_type``/``_text_type``/``_label_type`` (null when the source value had an acceptable
type, else the type found), ``source_file`` where the source has files, then the extra source
columns kept for the raw table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sparktune.errors import SparktuneError
from sparktune.redact import redact

__all__ = ["Loaded", "ReadOptions", "SourceCount", "keep_extras", "quote", "sql_str", "typed", "union"]

# Column names Delta stores without column mapping and Spark resolves without quoting rules.
_SAFE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
OUTPUT_COLUMNS = ("row_id", "split", "text", "label")
# Names the raw/quarantine tables or the intermediate frames use: a source column by one of
# these names (any case) is not stored as an extra column.
_RESERVED = frozenset(
    {"row_id", "split", "text", "label", "source_file", "reason", "reason_kind", "record", "source", "ingested_at"}
)


@dataclass
class SourceCount:
    """Records in the source, counted without Spark's parsers."""

    records: int
    method: str
    files: list = field(default_factory=list)


@dataclass(frozen=True)
class ReadOptions:
    """What a reader needs besides the source: the column names and --format / --split."""

    text_column: str = "text"
    label_column: str = "label"
    split: str | None = None
    fmt: str = "auto"


@dataclass
class Loaded:
    """A reader's answer: the normalised frame and the count to check it against."""

    df: Any
    count: SourceCount
    extras: list
    dropped: list
    pinned: dict = field(default_factory=dict)


def quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def sql_str(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def union(frames: list) -> Any:
    result = frames[0]
    for frame in frames[1:]:
        result = result.unionByName(frame, allowMissingColumns=True)
    return result


def keep_extras(names: Iterable[str], used: Iterable[str]) -> tuple[list, list]:
    """(extra columns to store, source columns left out); ``used`` are the text/label/split columns."""
    used_lower = {n.lower() for n in used}
    taken = set(_RESERVED) | used_lower
    keep, dropped = [], []
    for name in names:
        lower = name.lower()
        if _SAFE_NAME.match(name) and not name.startswith("_") and lower not in taken:
            keep.append(name)
            taken.add(lower)
        elif lower not in used_lower and lower not in (*OUTPUT_COLUMNS, "source_file"):
            dropped.append(name)
    return keep, dropped


def typed(df, text_column: str, label_column: str, default_split: str | None,
          extra_names: list | None = None) -> tuple[Any, list, list]:
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
    # row by row for valid UTF-8 in validate.
    strings = (T.StringType, T.VarcharType, T.CharType, T.BinaryType)
    scalars = strings + (T.NumericType, T.BooleanType)
    has_split = "split" in types
    record = F.to_json(F.struct(*[F.col(quote(c)) for c in names]))
    columns = [
        record.alias("_record"),
        F.lit(None).cast("string").alias("_problem"),
        (F.col("split").cast("string") if has_split else F.lit(default_split)).alias("_split"),
        (type_problem("split", strings) if has_split else F.lit(None).cast("string")).alias("_split_type"),
        F.col(quote(text_column)).cast("string").alias("_text"),
        type_problem(text_column, strings).alias("_text_type"),
        F.col(quote(label_column)).cast("string").alias("_label"),
        type_problem(label_column, scalars).alias("_label_type"),
    ]
    if "source_file" in df.columns:
        columns.append(F.col("source_file"))
    keep, dropped = keep_extras(extra_names if extra_names is not None else names,
                                [text_column, label_column, "split"])
    for name in keep:
        kind = types[name]
        value = F.col(quote(name))
        if isinstance(kind, T.StructType | T.ArrayType | T.MapType):
            value = F.to_json(value)
        columns.append(value.alias(name))
    return df.select(*columns), keep, dropped
