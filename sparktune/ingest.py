"""Stage 1: a text corpus (files, a folder, a Hugging Face dataset or a table) -> a raw Delta table.

Every input record ends in exactly one of two tables: the raw table (valid rows, with a stable
``row_id``) or the quarantine table (the original record and the ``reason`` it was rejected).
``input rows == raw rows + quarantined rows`` always holds, and the command prints all three.

Raw columns: ``row_id`` (string; a hash of split, label and text, so re-runs give the same ids
and exact duplicates share one), ``split``, ``text``, ``label`` (int, -1 for unlabelled), then
whatever else the source carried (e.g. IMDB's ``id`` and ``rating``, ``source_file``).
"""

from __future__ import annotations

import argparse
import glob
import os
from dataclasses import dataclass

from sparktune.errors import SparktuneError
from sparktune.results import StageResult
from sparktune.tables import parse_table_ref, table_exists, write_table

__all__ = ["IngestResult", "ingest", "detect_source", "default_quarantine_ref", "LABEL_NAMES", "UNLABELLED_SPLITS"]

LABEL_NAMES = {"neg": 0, "negative": 0, "pos": 1, "positive": 1, "unsup": -1, "unlabelled": -1, "unlabeled": -1}
UNLABELLED_SPLITS = ("unsupervised", "unsup", "unlabelled", "unlabeled")
KNOWN_SPLITS = ("train", "test", "validation", "valid", "dev", "eval") + UNLABELLED_SPLITS
FILE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json"}
_CORRUPT = "_corrupt_record"
_SEP = "\u001f"


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

    def summary(self) -> str:
        lines = [
            f"input rows:       {self.input_rows:>10,}",
            f"raw rows:         {self.raw_rows:>10,}  -> {self.output} (Delta version {self.output_version})",
            f"quarantined rows: {self.quarantined_rows:>10,}  -> {self.quarantine} (Delta version {self.quarantine_version})",
        ]
        for reason, count in sorted(self.reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {count:>8,}  {reason}")
        return "\n".join(lines)


def default_quarantine_ref(output: str) -> str:
    ref = parse_table_ref(output)
    if ref.is_path:
        return output.rstrip("/") + "_quarantine"
    return ref.name + "_quarantine"


def detect_source(source: str, fmt: str = "auto") -> tuple[str, str]:
    """Return ``(kind, location)``: kind is aclimdb, split-files, file, folder, delta, hf or table."""
    if fmt not in ("auto", "parquet", "csv", "json", "aclimdb", "hf", "table", "delta"):
        raise SparktuneError(f"--format {fmt!r} is not known: use auto, parquet, csv, json, aclimdb, delta, hf or table")
    if source.startswith("hf:") or fmt == "hf":
        return "hf", source[3:] if source.startswith("hf:") else source
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
        f"--source {source!r}: no such file or folder. Expected a Parquet/CSV/JSONL file or folder, an aclImdb folder, "
        "a Delta table path, 'hf:<dataset name>' or a table name."
    )


def _is_aclimdb(path: str) -> bool:
    return any(os.path.isdir(os.path.join(path, split, label)) for split in ("train", "test") for label in ("pos", "neg"))


def _split_files(path: str) -> list[str]:
    return sorted(
        f for f in os.listdir(path) if os.path.splitext(f)[1].lower() in FILE_FORMATS and not f.startswith((".", "_"))
    )


def _file_format(path: str, fmt: str) -> str:
    if fmt in ("parquet", "csv", "json"):
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_FORMATS:
        raise SparktuneError(
            f"{path}: cannot tell the format from the extension {ext!r}; expected one of "
            f"{', '.join(FILE_FORMATS)}, or pass --format parquet|csv|json"
        )
    return FILE_FORMATS[ext]


def _read_file(spark, path: str, fmt: str):
    """Read one file (or a folder of one format) keeping malformed records in ``_corrupt_record``.

    Every column is read as a string so that a label of the wrong type is quarantined with a
    reason rather than silently turned into null by type inference.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType, StructField, StructType

    if fmt == "parquet":
        df = spark.read.parquet(path)
        return df.withColumn(_CORRUPT, F.lit(None).cast("string"))
    if fmt == "csv":
        options = {"header": "true", "multiLine": "true", "escape": '"', "enforceSchema": "false"}
        header = spark.read.options(**options).csv(path)
        schema = StructType([StructField(f.name, StringType()) for f in header.schema.fields] + [StructField(_CORRUPT, StringType())])
        return (
            spark.read.options(**options)
            .schema(schema)
            .option("mode", "PERMISSIVE")
            .option("columnNameOfCorruptRecord", _CORRUPT)
            .csv(path)
        )
    df = spark.read.option("primitivesAsString", "true").option("mode", "PERMISSIVE").option(
        "columnNameOfCorruptRecord", _CORRUPT
    ).json(path)
    if _CORRUPT not in df.columns:
        df = df.withColumn(_CORRUPT, F.lit(None).cast("string"))
    return df


def _with_source_file(df):
    from pyspark.sql import functions as F

    return df.withColumn("source_file", F.col("_metadata.file_path"))


def _load(spark, kind: str, location: str, fmt: str, split: str | None):
    """The source as a DataFrame with a ``split`` column and ``_corrupt_record``; nothing validated yet."""
    from pyspark.sql import functions as F

    if kind == "aclimdb":
        pattern = os.path.join(location, "{train,test}", "{pos,neg,unsup}", "*.txt")
        df = spark.read.text(pattern, wholetext=True).withColumnRenamed("value", "text")
        df = _with_source_file(df)
        parts = F.split(F.col("source_file"), "/")
        n = F.size(parts)
        folder_split = F.element_at(parts, n - 2)
        label_folder = F.element_at(parts, n - 1)
        stem = F.regexp_replace(F.element_at(parts, n), r"\.txt$", "")
        return df.select(
            F.when(label_folder == "unsup", F.lit("unsupervised")).otherwise(folder_split).alias("split"),
            "text",
            label_folder.alias("label"),
            F.split(stem, "_").getItem(0).cast("long").alias("id"),
            F.split(stem, "_").getItem(1).cast("long").alias("rating"),
            "source_file",
            F.lit(None).cast("string").alias(_CORRUPT),
        )
    if kind == "split-files":
        frames = []
        for name in _split_files(location):
            path = os.path.join(location, name)
            df = _read_file(spark, path, _file_format(path, fmt))
            frames.append(_with_source_file(df).withColumn("split", F.lit(os.path.splitext(name)[0])))
        return _union(frames)
    if kind in ("file", "folder"):
        if kind == "folder":
            files = [f for f in glob.glob(os.path.join(location, "*")) if os.path.splitext(f)[1].lower() in FILE_FORMATS]
            if fmt == "auto" and not files:
                raise SparktuneError(f"--source {location}: the folder holds no .parquet, .csv or .jsonl files")
            fmt = fmt if fmt != "auto" else _file_format(files[0], "auto")
        df = _with_source_file(_read_file(spark, location, _file_format(location, fmt) if kind == "file" else fmt))
        if "split" in df.columns:
            return df
        stem = os.path.splitext(os.path.basename(location))[0].lower()
        default = split or (stem if kind == "file" and stem in KNOWN_SPLITS else "train")
        return df.withColumn("split", F.lit(default))
    if kind in ("delta", "table"):
        if kind == "table" and not table_exists(spark, location):
            raise SparktuneError(f"--source {location!r}: no such table in the session's catalog")
        df = spark.read.format("delta").load(location) if kind == "delta" else spark.read.table(location)
        if "split" not in df.columns:
            df = df.withColumn("split", F.lit(split or "train"))
        return df.withColumn(_CORRUPT, F.lit(None).cast("string"))
    if kind == "hf":
        return _load_hf(spark, location)
    raise AssertionError(kind)


def _union(frames):
    result = frames[0]
    for frame in frames[1:]:
        result = result.unionByName(frame, allowMissingColumns=True)
    return result


def _load_hf(spark, name: str):
    """Real ``datasets.load_dataset`` loading; offline it fails with how to use a local copy."""
    import pandas as pd
    from pyspark.sql import functions as F

    try:
        import datasets

        dataset = datasets.load_dataset(name)
    except Exception as exc:  # the hub raises many kinds: connection, offline mode, not found
        raise SparktuneError(
            f"could not load the Hugging Face dataset {name!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            "Without the hub, point --source at a local copy instead: a folder of split files such as "
            "../shared/data/imdb (train.parquet, test.parquet, ...), an aclImdb/ folder, or a Parquet/CSV/JSONL file."
        ) from None
    frames = []
    for split_name, split_data in dataset.items():
        pdf = split_data.to_pandas()
        pdf["split"] = split_name
        frames.append(pdf)
    df = spark.createDataFrame(pd.concat(frames, ignore_index=True))
    return df.withColumn(_CORRUPT, F.lit(None).cast("string"))


def _validate(df, text_column: str, label_column: str, num_labels: int):
    """Tag each record with ``reason`` (null when valid) and normalise text/label."""
    from pyspark.sql import functions as F

    problems = []
    if text_column not in df.columns:
        problems.append(f"the text column {text_column!r} is missing (found columns: {', '.join(c for c in df.columns if c != _CORRUPT)}); pass --text-column")
    if label_column not in df.columns:
        problems.append(f"the label column {label_column!r} is missing (found columns: {', '.join(c for c in df.columns if c != _CORRUPT)}); pass --label-column")
    if problems:
        raise SparktuneError("; ".join(problems))

    original = [c for c in df.columns if c not in (_CORRUPT,)]
    record = F.coalesce(F.col(_CORRUPT), F.to_json(F.struct(*[F.col(c) for c in original])))
    text = F.col(text_column).cast("string")
    label_raw = F.trim(F.col(label_column).cast("string"))
    label_name = F.lower(label_raw)
    mapping = F.create_map(*[x for k, v in LABEL_NAMES.items() for x in (F.lit(k), F.lit(v))])
    is_int = label_raw.rlike(r"^-?[0-9]+$")
    unlabelled_split = F.lower(F.col("split")).isin(*UNLABELLED_SPLITS)
    label = (
        F.when(is_int, label_raw.cast("int"))
        .when(mapping[label_name].isNotNull(), mapping[label_name])
        .when(F.col(label_column).isNull() & unlabelled_split, F.lit(-1))
    )
    reason = (
        F.when(F.col(_CORRUPT).isNotNull(), F.lit("unparseable record: the line/record does not match the file format"))
        .when(text.isNull(), F.lit("missing text"))
        .when(F.trim(text) == "", F.lit("empty text (blank or whitespace only)"))
        .when(F.col(label_column).isNull() & ~unlabelled_split, F.lit("missing label"))
        .when(
            label.isNull(),
            F.concat(F.lit("label has the wrong type: expected an integer or pos/neg/positive/negative, found "), label_raw),
        )
        .when(
            (label < -1) | (label >= num_labels),
            F.concat(F.lit(f"label out of range: expected -1 (unlabelled) or 0..{num_labels - 1}, found "), label_raw),
        )
    )
    extra = [c for c in original if c not in (text_column, label_column, "split", "text", "label")]
    return df.select(
        reason.alias("reason"),
        record.alias("record"),
        F.col("split").cast("string").alias("split"),
        text.alias("text"),
        label.cast("int").alias("label"),
        *[F.col(c) for c in extra],
    )


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
    """Read ``source``, validate every record, write the raw and quarantine Delta tables."""
    from pyspark import StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if num_labels < 1:
        raise SparktuneError(f"--num-labels must be at least 1, found {num_labels}")
    parse_table_ref(output)
    quarantine = quarantine or default_quarantine_ref(output)
    kind, location = detect_source(source, fmt)
    loaded = _load(spark, kind, location, fmt, split)
    tagged = _validate(loaded, text_column, label_column, num_labels)

    row_id = F.substring(F.sha2(F.concat_ws(_SEP, "split", F.col("label").cast("string"), "text"), 256), 1, 16)
    tagged = tagged.withColumn("row_id", F.when(F.col("reason").isNull(), row_id))
    # Exact duplicates (same split, label and text) share a row_id: keep one, quarantine the rest.
    first = Window.partitionBy("row_id").orderBy("record")
    tagged = tagged.withColumn(
        "reason",
        F.when(
            F.col("reason").isNull() & (F.row_number().over(first) > 1),
            F.concat(F.lit("exact duplicate of row_id "), F.col("row_id")),
        ).otherwise(F.col("reason")),
    )
    # Spark refuses queries on raw CSV/JSON that read only the corrupt-record column; persisting
    # also reads the source once for the two tables and the counts.
    tagged = tagged.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        extra = [c for c in tagged.columns if c not in ("reason", "record", "row_id", "split", "text", "label")]
        raw = tagged.where(F.col("reason").isNull()).select("row_id", "split", "text", "label", *extra)
        rejected = tagged.where(F.col("reason").isNotNull()).select(
            "reason", "record", "split", F.lit(source).alias("source"), F.current_timestamp().alias("ingested_at")
        )
        provenance = {"sparktune.stage": "ingest", "sparktune.source": source, "sparktune.source_kind": kind}
        output_version = write_table(raw, output, properties=provenance, user_metadata=provenance)
        quarantine_version = write_table(rejected, quarantine, properties=provenance, user_metadata=provenance)
        counts = {r["reason"]: r["count"] for r in tagged.groupBy("reason").count().collect()}
    finally:
        tagged.unpersist()
    raw_rows = counts.pop(None, 0)
    result = IngestResult(
        output=output,
        quarantine=quarantine,
        input_rows=raw_rows + sum(counts.values()),
        raw_rows=raw_rows,
        quarantined_rows=sum(counts.values()),
        output_version=output_version,
        quarantine_version=quarantine_version,
        reasons=_group_reasons(counts),
    )
    return result


def _group_reasons(counts: dict) -> dict:
    """Collapse per-value reasons ('... found abc') into their kind for the printed summary."""
    grouped: dict = {}
    for reason, count in counts.items():
        key = reason.split(":")[0] if not reason.startswith("exact duplicate") else "exact duplicate"
        grouped[key] = grouped.get(key, 0) + count
    return grouped


def add_cli(subparsers) -> None:
    from sparktune.cli import stage_parser

    parser = stage_parser(
        subparsers,
        "ingest",
        help="read a corpus into a raw Delta table, quarantining bad rows",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", required=True, help="file, folder, aclImdb/ folder, Delta path, hf:NAME or table name")
    parser.add_argument("--output", required=True, help="raw TABLE (a path or a catalog name)")
    parser.add_argument("--quarantine", help="TABLE for rejected rows (default: OUTPUT_quarantine)")
    parser.add_argument("--format", default="auto", dest="fmt", help="auto (default), parquet, csv, json, aclimdb, delta, hf, table")
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
