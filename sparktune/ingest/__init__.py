"""Stage 1, ingest: a text corpus -> a raw Delta table and its quarantine (see ``stage``'s docstring).

Modules, each importing only those above it:

- ``rules``: the record rules (``Reason``, label names, what blank means).
- ``sources``: ``SourceKind`` and ``detect_source``, the one place a ``--source`` gets its kind.
- ``frame``: the normalised frame every reader returns (``Loaded``) with its ``SourceCount``.
- ``csv_reader``, ``json_reader``, ``parquet_reader``: one file format each, with its own count.
- ``files_reader``, ``aclimdb_reader``, ``delta_reader`` (Delta paths and tables), ``hf_reader``:
  one reader per kind; ``readers.read_source`` dispatches on the kind.
- ``validate``: reasons, normalised split and label, ``row_id`` and duplicates.
- ``result``: ``IngestResult``.
- ``stage``: ``ingest()`` (setup -> read -> validate -> write), ``IngestSettings`` (its flags and
  pipeline section) and ``ingest_stage``.
"""

from sparktune.ingest.csv_reader import csv_records
from sparktune.ingest.files_reader import count_source_records
from sparktune.ingest.frame import SourceCount
from sparktune.ingest.result import IngestResult, default_quarantine_ref
from sparktune.ingest.rules import LABEL_NAMES, UNLABELLED_SPLITS, Reason, is_blank
from sparktune.ingest.sources import Source, SourceKind, detect_source
from sparktune.ingest.stage import IngestSettings, add_cli, ingest, ingest_stage

__all__ = [
    "LABEL_NAMES",
    "UNLABELLED_SPLITS",
    "IngestResult",
    "IngestSettings",
    "Reason",
    "Source",
    "SourceCount",
    "SourceKind",
    "add_cli",
    "count_source_records",
    "csv_records",
    "default_quarantine_ref",
    "detect_source",
    "ingest",
    "ingest_stage",
    "is_blank",
]
