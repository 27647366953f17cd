"""Parquet: Spark's reader (schemas merged); the count is the row counts of the file footers."""

from __future__ import annotations

from typing import Any

from sparktune.errors import SparktuneError
from sparktune.ingest.frame import typed
from sparktune.redact import redact
from sparktune.tables import spark_path

__all__ = ["METHOD", "count", "read"]

METHOD = "Parquet footers"


def count(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def read(spark, files: list, text_column: str, label_column: str, default_split: str | None) -> tuple[Any, list, list]:
    from pyspark.sql import functions as F

    try:
        df = spark.read.option("mergeSchema", "true").parquet(*[spark_path(f) for f in files])
    except Exception as exc:  # AnalysisException: the files' schemas conflict
        raise SparktuneError(
            f"the Parquet files cannot be read as one table ({type(exc).__name__}: "
            f"{redact(str(exc).splitlines()[0])[:300]}); "
            "give files with compatible column types"
        ) from None
    df = df.withColumn("source_file", F.col("_metadata.file_path"))
    return typed(df, text_column, label_column, default_split)
