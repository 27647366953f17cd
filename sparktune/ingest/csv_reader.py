"""CSV: records by Python's ``csv`` module, with recovery from broken quoting, in the executors.

The count (``count``) reads each file with the same parser on the driver, independent of Spark.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

from sparktune.errors import SparktuneError, bounded
from sparktune.ingest.frame import keep_extras
from sparktune.ingest.rules import NOT_UTF8, NOT_UTF8_REASON, Reason
from sparktune.redact import redact
from sparktune.tables import spark_path

__all__ = ["METHOD", "count", "csv_records", "read"]

METHOD = "csv records (Python csv)"
CsvRecord = tuple[int, str, list | None, str | None]


def _lines(handle) -> Iterator[str]:
    # newline='' handles split lines at LF, CR and CRLF and keep the endings: the same line
    # ends as Hadoop's line reader, and the record's original text stays intact.
    yield from handle


def csv_records(lines: Iterable[str]) -> Iterator[CsvRecord]:
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


def _csv_single_line(number: int, line: str) -> CsvRecord:
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


def count(path: str) -> int:
    """Data records of one CSV file (the header is not one), by the parser the reader uses."""
    with _open_text(path) as handle:
        records = sum(1 for _ in csv_records(_lines(handle)))
    return max(records - 1, 0)


def _parse_csv_file(path: str, text: str) -> Iterator[dict]:
    """One dict per data record of one CSV file (the header is not a record)."""
    text = text.removeprefix("\ufeff")
    header: list | None = None
    for number, original, fields, problem in csv_records(io.StringIO(text, newline="")):
        if header is None:
            header = fields if fields else []
            continue
        row: dict[str, Any] = {"source_file": path, "_line": number, "_record": original, "_fields": None,
                               "_problem": None}
        if NOT_UTF8.search(original):
            row["_record"] = original.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            row["_problem"] = NOT_UTF8_REASON
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


def _header_names(files: list, text_column: str, label_column: str) -> list:
    """The union of the files' header names; a repeated or missing column fails before Spark reads."""
    headers = {path: _csv_header(path) for path in files}
    names: list = []
    for header in headers.values():
        names += [n for n in header if n not in names]
    if not any(headers.values()):
        return names
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
    return names


def read(spark, files: list, text_column: str, label_column: str, default_split: str | None) -> tuple[Any, list, list]:
    """CSV parsed by Python's csv module in the executors, one file per task."""
    from pyspark.sql import functions as F

    names = _header_names(files, text_column, label_column)
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
    keep, dropped = keep_extras(names, [text_column, label_column, "split"])
    columns += [F.col("_m")[name].alias(name) for name in keep]
    return parsed.select(*columns), keep, dropped
