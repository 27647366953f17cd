"""``hf:NAME``: a Hugging Face hub dataset by ``datasets.load_dataset``; the count is its rows."""

from __future__ import annotations

from typing import Any

from sparktune.errors import SparktuneError
from sparktune.ingest.frame import Loaded, ReadOptions, SourceCount, typed
from sparktune.ingest.sources import SourceKind
from sparktune.redact import redact

__all__ = ["METHOD", "load", "read"]

METHOD = "rows of the Hugging Face dataset"


def load(spark, name: str) -> tuple[Any, int]:
    """Real ``datasets.load_dataset`` loading; offline it fails with how to use a local copy.

    Returns the dataset's splits as one Spark frame (a ``split`` column from the split's name
    unless the dataset has one) and its row count, counted on the loaded splits.
    """
    import pandas as pd

    try:
        import datasets

        dataset = datasets.load_dataset(name)
    except Exception as exc:  # the hub raises many kinds: connection, offline mode, not found
        raise SparktuneError(
            f"could not load the Hugging Face dataset {redact(name)!r} ({type(exc).__name__}: "
            f"{redact(str(exc).splitlines()[0])[:200]}). "
            "Without the hub, point --source at a local copy instead: a folder of split files such as "
            "../shared/data/imdb (train.parquet, test.parquet, ...), an aclImdb/ folder, or a Parquet/CSV/JSONL file."
        ) from None
    frames = []
    for split_name, split_data in dataset.items():
        pdf = split_data.to_pandas()
        if "split" not in pdf.columns:
            pdf["split"] = split_name
        frames.append(pdf)
    records = sum(len(f) for f in frames)
    return spark.createDataFrame(pd.concat(frames, ignore_index=True)), records


def read(spark, kind: SourceKind, location: str, options: ReadOptions) -> Loaded:
    df, records = load(spark, location)
    frame, keep, dropped = typed(df, options.text_column, options.label_column, options.split or "train")
    return Loaded(frame, SourceCount(records, METHOD), keep, dropped)
