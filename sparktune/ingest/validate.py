"""Validation: each record gets a ``reason`` (null when valid) and ``reason_kind``; kept rows a ``row_id``.

The first rule that a record breaks names its reason (``Reason`` values start every reason).
Splits and labels are trimmed of blank characters and labels normalised to ints; exact
duplicates (same split, label and text) share a ``row_id``: one is kept, the rest quarantined.
"""

from __future__ import annotations

from typing import Any

from sparktune.ingest.frame import quote
from sparktune.ingest.rules import (
    LABEL_NAMES,
    NOT_UTF8_REASON,
    QUOTE_CHARS,
    UNLABELLED_SPLITS,
    Reason,
    blank_java,
    trim_java,
)

__all__ = ["mark_duplicates", "validate"]

_SEP = "\u001f"


def _trim(column):
    from pyspark.sql import functions as F

    return F.regexp_replace(column, trim_java(), "")


def _missing(column):
    from pyspark.sql import functions as F

    return F.coalesce(column.isNull() | (column == ""), F.lit(True))


def _label_value(label):
    """``(looks integral, its long value, the label as a long or null)`` of a trimmed label string."""
    from pyspark.sql import functions as F

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
    return looks_integral, as_long, value


def _not_utf8(df, extras: list):
    """True where any string that would reach the raw table is not valid UTF-8.

    Spark strings may hold any bytes: a Latin-1 file read as text keeps them, and tokenize,
    polars or DuckDB then fail on the row.
    """
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    texts = ["_split", "_text", "_label"] + [f.name for f in df.schema.fields
                                              if f.name in extras and isinstance(f.dataType, T.StringType)]
    flag = F.lit(False)
    for name in texts:
        flag = flag | F.coalesce(~F.expr(f"is_valid_utf8({quote(name)})"), F.lit(False))
    return flag


def _reason(df, num_labels: int, extras: list, split, label):
    """The first rule the record breaks, as the reason text (null when it breaks none)."""
    from pyspark.sql import functions as F

    expected_label = f"expected an integer in -1..{num_labels - 1} or pos/neg/positive/negative, found "

    def wrong(reason: Reason, found):
        return F.concat(F.lit(reason.value + ": " + expected_label), F.substring(found, 1, QUOTE_CHARS))

    text = F.col("_text")
    label_missing = _missing(label)
    unlabelled = F.coalesce(F.lower(split).isin(*UNLABELLED_SPLITS), F.lit(False))
    looks_integral, as_long, value = _label_value(label)
    checks = [
        (F.col("_problem").isNotNull(), F.col("_problem")),
        (_not_utf8(df, extras), F.lit(NOT_UTF8_REASON)),
        (_missing(split), F.lit(Reason.MISSING_SPLIT.value)),
        (F.col("_split_type").isNotNull(),
         F.concat(F.lit(Reason.SPLIT_WRONG_TYPE.value + ": expected a string, found "), F.col("_split_type"))),
        (F.col("_text_type").isNotNull(),
         F.concat(F.lit(Reason.TEXT_WRONG_TYPE.value + ": expected a string, found "), F.col("_text_type"))),
        (text.isNull(), F.lit(Reason.MISSING_TEXT.value)),
        (F.coalesce(text.rlike(blank_java()), F.lit(False)), F.lit(Reason.EMPTY_TEXT.value)),
        (F.col("_label_type").isNotNull(), wrong(Reason.LABEL_WRONG_TYPE, F.col("_label_type"))),
        (label_missing & ~unlabelled, F.lit(Reason.MISSING_LABEL.value)),
        (label_missing, F.lit(None).cast("string")),  # unlabelled split: -1
        (looks_integral & as_long.isNull(), wrong(Reason.LABEL_OUT_OF_RANGE, label)),
        (value.isNull(), wrong(Reason.LABEL_WRONG_TYPE, label)),
        (F.coalesce((value < -1) | (value >= num_labels), F.lit(True)), wrong(Reason.LABEL_OUT_OF_RANGE, label)),
    ]
    reason = F.when(*checks[0])
    for condition, message in checks[1:]:
        reason = reason.when(condition, message)
    out_label = F.when(label_missing & unlabelled, F.lit(-1)).otherwise(
        F.when(F.coalesce((value >= -1) & (value < num_labels), F.lit(False)), value)
    ).cast("int")
    return reason, out_label


def _reason_kind(tagged):
    """``reason_kind``: the ``Reason`` the reason starts with ("other" for none), null when valid."""
    from pyspark.sql import functions as F

    kind = F.lit(None).cast("string")
    for k in sorted((r.value for r in Reason), key=len):  # longest prefix wins
        kind = F.when(F.col("reason").startswith(k), F.lit(k)).otherwise(kind)
    return tagged.withColumn(
        "reason_kind", F.when(F.col("reason").isNotNull(), F.coalesce(kind, F.lit("other"))).otherwise(F.lit(None))
    )


def validate(df, num_labels: int, extras: list) -> Any:
    """Tag each record with ``reason`` (null when valid) and ``reason_kind``; normalise split/label."""
    from pyspark.sql import functions as F

    split = _trim(F.col("_split"))
    reason, out_label = _reason(df, num_labels, extras, split, _trim(F.col("_label")))
    tagged = df.select(
        reason.alias("reason"),
        # The quarantined record as found, except bytes that are not UTF-8 (shown as U+FFFD).
        F.expr("make_valid_utf8(_record)").alias("record"),
        split.alias("split"),
        F.col("_text").alias("text"),
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
    return _reason_kind(tagged)


def mark_duplicates(tagged) -> Any:
    """Give valid rows a ``row_id`` (a hash of split, label and text); quarantine all but one of each id."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    row_id = F.substring(F.sha2(F.concat_ws(_SEP, "split", F.col("label").cast("string"), "text"), 256), 1, 16)
    tagged = tagged.withColumn("row_id", F.when(F.col("reason").isNull(), row_id))
    first = Window.partitionBy("row_id").orderBy("record")
    # Computed once into a column: the two updates below must agree on which rows it marks.
    tagged = tagged.withColumn(
        "_duplicate",
        F.coalesce(F.col("reason").isNull() & F.col("row_id").isNotNull() & (F.row_number().over(first) > 1),
                   F.lit(False)),
    )
    return (
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
