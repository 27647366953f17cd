"""Files: one file, a folder of files (one split) or a folder of split files (train.parquet, ...).

Each file is read by the reader of its format (CSV, JSONL, Parquet) and counted by that
format's own counter, without Spark: ``count_source_records``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

from sparktune.errors import SparktuneError
from sparktune.ingest import csv_reader, json_reader, parquet_reader
from sparktune.ingest.frame import Loaded, ReadOptions, SourceCount, union
from sparktune.ingest.rules import KNOWN_SPLITS
from sparktune.ingest.sources import SourceKind, file_format, folder_files, split_files
from sparktune.redact import redact

__all__ = ["FORMAT_READERS", "FormatReader", "count_source_records", "read"]


class FormatReader(NamedTuple):
    """``read(spark, files, text_column, label_column, default_split)`` and ``count(file)``."""

    read: Callable[..., tuple[Any, list, list]]
    count: Callable[[str], int]
    method: str


FORMAT_READERS = {
    "json": FormatReader(json_reader.read, json_reader.count, json_reader.METHOD),
    "csv": FormatReader(csv_reader.read, csv_reader.count, csv_reader.METHOD),
    "parquet": FormatReader(parquet_reader.read, parquet_reader.count, parquet_reader.METHOD),
}


def count_source_records(files_by_format: dict) -> SourceCount:
    """Count the records of ``{format: [files]}`` with Python/pyarrow alone."""
    total = 0
    methods = []
    for fmt, files in files_by_format.items():
        reader = FORMAT_READERS[fmt]
        total += sum(reader.count(f) for f in files)
        methods.append(reader.method)
    return SourceCount(total, ", ".join(methods) or "no files", [f for fs in files_by_format.values() for f in fs])


def _groups(kind: SourceKind, location: str, options: ReadOptions) -> list[tuple[list, str, str]]:
    """``(files, format, default split)`` per group of files read together."""
    fmt, split = options.fmt, options.split
    if kind is SourceKind.SPLIT_FILES:
        return [([os.path.join(location, n)], file_format(os.path.join(location, n), fmt), os.path.splitext(n)[0])
                for n in split_files(location)]
    if kind is SourceKind.FILE:
        stem = os.path.splitext(os.path.basename(location))[0].lower()
        default = split or (stem if stem in KNOWN_SPLITS else "train")
        return [([location], file_format(location, fmt), default)]
    files = folder_files(location, fmt)
    if not files:
        raise SparktuneError(f"--source {redact(location)}: the folder holds no .parquet, .csv or .jsonl files")
    by_format: dict = {}
    for f in files:
        by_format.setdefault(file_format(f, fmt), []).append(f)
    return [(fs, f, split or "train") for f, fs in by_format.items()]


def read(spark, kind: SourceKind, location: str, options: ReadOptions) -> Loaded:
    """The files as one normalised frame, with the files' independent count."""
    frames, keeps, dropped = [], [], []
    counts: dict[str, list] = {}
    for files, fmt, default_split in _groups(kind, location, options):
        frame, keep, drop = FORMAT_READERS[fmt].read(spark, files, options.text_column, options.label_column,
                                                      default_split)
        frames.append(frame)
        keeps += [k for k in keep if k not in keeps]
        dropped += [d for d in drop if d not in dropped]
        counts.setdefault(fmt, []).extend(files)
    return Loaded(union(frames), count_source_records(counts), keeps, dropped)
