"""One reader per ``SourceKind``: ``read_source`` is the only dispatch on the kind."""

from __future__ import annotations

from collections.abc import Callable

from sparktune.ingest import aclimdb_reader, delta_reader, files_reader, hf_reader
from sparktune.ingest.frame import Loaded, ReadOptions
from sparktune.ingest.sources import Source, SourceKind

__all__ = ["READERS", "read_source"]

Reader = Callable[..., Loaded]

# Each reader returns the normalised frame and its own count of the source's records.
READERS: dict[SourceKind, Reader] = {
    SourceKind.ACLIMDB: aclimdb_reader.read,
    SourceKind.SPLIT_FILES: files_reader.read,
    SourceKind.FILE: files_reader.read,
    SourceKind.FOLDER: files_reader.read,
    SourceKind.DELTA: delta_reader.read,
    SourceKind.TABLE: delta_reader.read,
    SourceKind.HF: hf_reader.read,
}


def read_source(spark, source: Source, options: ReadOptions) -> Loaded:
    """The source as the normalised frame, with its independent record count."""
    return READERS[source.kind](spark, source.kind, source.location, options)
