"""JSONL: read as text lines and parsed per line, so no line can be dropped or multiplied.

The count (``count``) is the file's lines (LF, CR or CRLF), read without Spark.
"""

from __future__ import annotations

import io
from typing import Any

from sparktune.errors import SparktuneError
from sparktune.ingest.frame import keep_extras, sql_str
from sparktune.ingest.rules import NOT_UTF8_REASON, QUOTE_CHARS, Reason, blank_java
from sparktune.redact import redact
from sparktune.tables import spark_path

__all__ = ["METHOD", "count", "read"]

METHOD = "lines"


def count(path: str) -> int:
    """Lines of one file, ended the way Hadoop's line reader ends them (LF, CR or CRLF)."""
    with open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="latin-1", newline="") as handle:
        return sum(1 for _ in handle)


def _keys(lines, parsed, text_column: str, label_column: str) -> list:
    """The top-level keys of the records; the text and label keys must be among them."""
    from pyspark.sql import functions as F

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
    return keys


def _problem():
    """The line's structural problem (null when it is one JSON object with distinct keys)."""
    from pyspark.sql import functions as F

    # try_parse_json refuses an object with a repeated key (Spark's variant keeps one value per
    # key); json_object_keys (Jackson) accepts it and lists every key: such a line is valid JSON
    # whose meaning is ambiguous, so it is quarantined as a repeated key rather than guessed.
    top_keys = F.expr("json_object_keys(value)")
    repeated = F.expr("array_distinct(filter(json_object_keys(value), k -> "
                      "size(filter(json_object_keys(value), j -> j = k)) > 1))")
    return (
        F.when(~F.expr("is_valid_utf8(value)"), F.lit(NOT_UTF8_REASON))
        .when(F.col("value").rlike(blank_java()), F.lit(Reason.BLANK_RECORD.value))
        .when(F.col("_v").isNull() & (F.size(repeated) > 0),
              F.concat(F.lit(Reason.REPEATED_KEY.value + ": the object repeats "),
                       F.substring(F.array_join(repeated, ", "), 1, QUOTE_CHARS),
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


def _get(name: str, kind: str):
    from pyspark.sql import functions as F

    return F.expr(f"try_variant_get(_v, '$[\\'{sql_str(name)}\\']', '{kind}')")


def _vtype(name: str):
    from pyspark.sql import functions as F

    return F.expr(f"schema_of_variant(variant_get(_v, '$[\\'{sql_str(name)}\\']'))")


def _not_string(name: str):
    from pyspark.sql import functions as F

    t = _vtype(name)
    return F.when(t.isNull() | t.isin("STRING", "VOID"), F.lit(None).cast("string")).otherwise(t)


def _not_scalar(name: str):
    from pyspark.sql import functions as F

    t = _vtype(name)
    return F.when(
        t.isNull() | ~(t.startswith("OBJECT") | t.startswith("ARRAY")), F.lit(None).cast("string")
    ).otherwise(t)


def _extra(name: str):
    """An extra key as a string column: strings as they are, other values as JSON."""
    from pyspark.sql import functions as F

    t = _vtype(name)
    as_json = F.expr(f"to_json(variant_get(_v, '$[\\'{sql_str(name)}\\']'))")
    return (
        F.when(t.isNull() | (t == "VOID"), F.lit(None).cast("string"))
        .when(t == "STRING", _get(name, "string"))
        .otherwise(as_json)
        .alias(name)
    )


def read(spark, files: list, text_column: str, label_column: str, default_split: str | None) -> tuple[Any, list, list]:
    """The JSONL files as the normalised frame: one row per line."""
    from pyspark.sql import functions as F

    lines = spark.read.text([spark_path(f) for f in files]).select(
        F.col("value"), F.col("_metadata.file_path").alias("source_file"))
    parsed = lines.select("value", "source_file", F.expr("try_parse_json(value)").alias("_v"))
    parsed = parsed.withColumn("_vtype", F.expr("schema_of_variant(_v)"))
    keys = _keys(lines, parsed, text_column, label_column)
    has_split = "split" in keys
    columns = [
        F.col("value").alias("_record"),
        _problem().alias("_problem"),
        (_get("split", "string") if has_split else F.lit(default_split)).alias("_split"),
        (_not_string("split") if has_split else F.lit(None).cast("string")).alias("_split_type"),
        _get(text_column, "string").alias("_text"),
        _not_string(text_column).alias("_text_type"),
        _get(label_column, "string").alias("_label"),
        _not_scalar(label_column).alias("_label_type"),
        F.col("source_file"),
    ]
    keep, dropped = keep_extras(keys, [text_column, label_column, "split"])
    columns += [_extra(name) for name in keep]
    return parsed.select(*columns), keep, dropped
