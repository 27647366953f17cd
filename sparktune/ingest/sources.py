"""What a ``--source`` is, decided in one place: a ``SourceKind`` and where it lives.

Also the file listings the readers share (which files of a folder are records), so that a
reader and its independent count see the same files.
"""

from __future__ import annotations

import glob
import os
from enum import Enum
from typing import NamedTuple

from sparktune.errors import SparktuneError
from sparktune.redact import redact
from sparktune.tables import parse_table_ref

__all__ = [
    "FILE_FORMATS",
    "FORMATS",
    "Source",
    "SourceKind",
    "aclimdb_files",
    "detect_source",
    "file_format",
    "folder_files",
    "split_files",
    "visible",
]

# Extension -> the file format its reader reads.
FILE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json"}
# What --format accepts: auto-detection, a file format (forces the reader of every file) or a kind.
FORMATS = ("auto", "parquet", "csv", "json", "aclimdb", "delta", "hf", "table")


class SourceKind(str, Enum):
    """The kinds of source ingest reads; each has one reader (``sparktune.ingest.readers.READERS``)."""

    ACLIMDB = "aclimdb"  # an aclImdb/ folder: train|test/pos|neg|unsup/<id>_<rating>.txt
    SPLIT_FILES = "split-files"  # a folder of train.parquet, test.csv, ...: the file name is the split
    FILE = "file"  # one Parquet, CSV or JSONL file
    FOLDER = "folder"  # a folder of Parquet, CSV or JSONL files (one split, --split or 'train')
    DELTA = "delta"  # a Delta table by path
    TABLE = "table"  # a table of the session's catalog
    HF = "hf"  # hf:NAME, a Hugging Face hub dataset

    def __str__(self) -> str:
        return self.value


class Source(NamedTuple):
    kind: SourceKind
    location: str


def detect_source(source: str, fmt: str = "auto") -> Source:
    """Return ``(kind, location)``; a source that is none of the kinds fails naming what was expected."""
    if fmt not in FORMATS:
        raise SparktuneError(f"--format {fmt!r} is not known: use {', '.join(FORMATS[:-1])} or {FORMATS[-1]}")
    if source.startswith("hf:") or fmt == "hf":
        return Source(SourceKind.HF, source.removeprefix("hf:"))
    if fmt == "table":
        return Source(SourceKind.TABLE, source)
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.isdir(path):
        return Source(_folder_kind(path, fmt), path)
    if os.path.isfile(path):
        return Source(SourceKind.FILE, path)
    if "/" not in source and parse_table_ref(source).name:
        return Source(SourceKind.TABLE, source)
    raise SparktuneError(
        f"--source {redact(source)!r}: no such file or folder. Expected a Parquet/CSV/JSONL file or folder, an aclImdb "
        "folder, a Delta table path, 'hf:<dataset name>' or a table name."
    )


def _folder_kind(path: str, fmt: str) -> SourceKind:
    if fmt == "delta" or os.path.isdir(os.path.join(path, "_delta_log")):
        return SourceKind.DELTA
    if fmt == "aclimdb" or _is_aclimdb(path):
        return SourceKind.ACLIMDB
    if split_files(path):
        return SourceKind.SPLIT_FILES
    return SourceKind.FOLDER


def _is_aclimdb(path: str) -> bool:
    return any(
        os.path.isdir(os.path.join(path, split, label)) for split in ("train", "test") for label in ("pos", "neg")
    )


def visible(name: str) -> bool:
    """Files whose names start with ``_`` or ``.`` are not records (Spark's listing skips them too)."""
    return not name.startswith((".", "_"))


def split_files(path: str) -> list[str]:
    """Names of a folder's files named like ``<split>.<format extension>``."""
    return sorted(
        f for f in os.listdir(path)
        if os.path.splitext(f)[1].lower() in FILE_FORMATS and visible(f) and os.path.isfile(os.path.join(path, f))
    )


def folder_files(location: str, fmt: str) -> list[str]:
    """A folder's record files: those with a known extension, or every visible file when --format names one."""
    return sorted(
        f for f in glob.glob(os.path.join(glob.escape(location), "*"))
        if os.path.isfile(f) and visible(os.path.basename(f))
        and (fmt in ("parquet", "csv", "json") or os.path.splitext(f)[1].lower() in FILE_FORMATS)
    )


def file_format(path: str, fmt: str) -> str:
    """The file's format: the one --format names, else the one its extension says."""
    if fmt in ("parquet", "csv", "json"):
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_FORMATS:
        raise SparktuneError(
            f"{redact(path)}: cannot tell the format from the extension {ext!r}; expected one of "
            f"{', '.join(FILE_FORMATS)}, or pass --format parquet|csv|json"
        )
    return FILE_FORMATS[ext]


def aclimdb_files(location: str) -> list[str]:
    """The record files of an aclImdb folder, in the order Spark's pattern matches them."""
    files = []
    for split in ("train", "test"):
        for label in ("pos", "neg", "unsup"):
            folder = os.path.join(location, split, label)
            if os.path.isdir(folder):
                files += [
                    os.path.join(folder, f) for f in sorted(os.listdir(folder))
                    if f.endswith(".txt") and visible(f) and os.path.isfile(os.path.join(folder, f))
                ]
    return files
