"""aclImdb: one record per ``train|test/pos|neg|unsup/*.txt`` file; the count is the files listed."""

from __future__ import annotations

import os

from sparktune.ingest.frame import Loaded, ReadOptions, SourceCount
from sparktune.ingest.rules import Reason
from sparktune.ingest.sources import SourceKind, aclimdb_files
from sparktune.tables import spark_path

__all__ = ["METHOD", "count", "read"]

METHOD = "files of the aclImdb folder"


def count(location: str) -> SourceCount:
    files = aclimdb_files(location)
    return SourceCount(len(files), METHOD, files)


def read(spark, kind: SourceKind, location: str, options: ReadOptions) -> Loaded:
    """A file not named ``<id>_<rating>.txt`` is quarantined; id and rating are kept as columns."""
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
    return Loaded(df.select(*columns), count(location), ["id", "rating"], [])
