"""Batch inference in Spark (a pandas UDF) and in one process (the baseline it is measured against).

Executors need nothing from the driver's disk: the UDF closure carries the model's immutable
MLflow URI and the tracking URI (never a credential: executors use their own environment's),
and each executor process fetches the model itself, once, into a local cache
(``sparktune.model.resolve.fetch_model``). A model given as a folder must be on storage every
worker sees. Executors with a GPU use it. DataFrame API only (no ``sparkContext``/``rdd``), so
this runs on Spark Connect too.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparktune.errors import SparktuneError
from sparktune.model.resolve import ResolvedModel
from sparktune.tasks import TOKENIZED, Task

__all__ = [
    "CLASSIFIER_OUT",
    "INSTRUCTION_OUT",
    "LM_OUT",
    "SPARK_OUT",
    "InputColumn",
    "input_column",
    "predict_local",
    "score_spark",
    "spark_columns",
    "task_threads",
]

CLASSIFIER_OUT = "prediction int, probabilities array<double>"
LM_OUT = "loss_sum double, n_predicted long"
INSTRUCTION_OUT = CLASSIFIER_OUT + ", " + LM_OUT
"""An instruction model: the classifier's answer (by scoring each class's answer) and the prompt's loss."""
SPARK_OUT = {Task.CLASSIFICATION: CLASSIFIER_OUT, Task.CAUSAL_LM: LM_OUT, Task.INSTRUCTION: INSTRUCTION_OUT}
"""The struct ``score_spark`` adds, per task: the fields of ``spark_columns`` it computes."""


def spark_columns(out) -> dict:
    """The columns of ``SPARK_OUT`` from ``hf.Predictions``, in that order (those the task computed)."""
    columns: dict = {}
    if out.probabilities is not None:
        columns.update(prediction=out.prediction.astype("int32"), probabilities=list(out.probabilities))
    if out.loss_sum is not None:
        columns.update(loss_sum=out.loss_sum, n_predicted=out.n_predicted)
    return columns


@dataclass(frozen=True)
class InputColumn:
    name: str
    is_text: bool
    """True for raw text (tokenized on the executor), False for a tokenized ``input_ids`` column."""


def input_column(df, text_column: str | None = None) -> InputColumn:
    """``input_ids`` of a tokenized table, else the text column (``text`` unless named)."""
    if text_column:
        if text_column not in df.columns:
            raise SparktuneError(f"--text-column {text_column}: the table has columns {df.columns}")
        return InputColumn(text_column, True)
    if TOKENIZED.input_ids in df.columns:
        return InputColumn(TOKENIZED.input_ids, False)
    if "text" in df.columns:
        return InputColumn("text", True)
    raise SparktuneError(f"the table has columns {df.columns}; expected `input_ids` (a tokenized table from "
                         "`sparktune tokenize`) or `text` (raw text; name another with --text-column)")


def task_threads(spark) -> int:
    """Torch threads per Spark task: the cores a task holds (``spark.task.cpus``), so concurrent
    tasks on one executor split its cores instead of each using all of them and thrashing."""
    from sparktune.spark import session_facts

    return session_facts(spark).task_cpus


def _partitions(spark) -> int:
    from sparktune.spark import session_facts

    facts = session_facts(spark)
    return max(1, facts.default_parallelism or facts.shuffle_partitions or 2)


def score_spark(df, model: ResolvedModel, tracker=None, column: InputColumn | None = None, batch_size: int = 32,
                threads: int | None = None, bf16: bool | str | None = None):
    """``df`` with a struct column ``_out``: ``prediction``/``probabilities`` for a classifier,
    ``loss_sum``/``n_predicted`` for a causal LM, both for an instruction model (whose input is
    raw text, made into prompts here, or prompt ids: ``input_ids[:prompt_tokens]``).

    ``bf16``: True/False/``auto``; None: each executor's ``$SPARKTUNE_BF16``, else auto (on where
    bf16 beats fp32 on the executor's own device: ``sparktune.model.hf.resolve_bf16``)."""
    from collections.abc import Iterator

    import pandas as pd
    from pyspark.sql import functions as F

    column = column or input_column(df)
    spark = df.sparkSession
    threads = threads or task_threads(spark)
    # Spread the rows over every task slot: a small Delta table is often a single file.
    df = df.repartition(_partitions(spark))
    source, task, max_length = model.source, model.task.value, model.max_length
    tracking_uri = tracker.tracking_uri if tracker is not None else None
    registry_uri = tracker.registry_uri if tracker is not None else None
    is_text = column.is_text
    schema = SPARK_OUT[model.task]

    def run(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        from sparktune.model import hf
        from sparktune.model.resolve import fetch_model

        core = hf.load(fetch_model(source, tracking_uri, registry_uri), task, max_length, threads=threads, bf16=bf16)
        for values in batches:
            rows = values.tolist()
            out = (hf.predict(core, rows, batch_size=batch_size) if is_text
                   else hf.predict(core, ids=rows, batch_size=batch_size))
            yield pd.DataFrame(spark_columns(out))

    # Real types, not the strings `from __future__ import annotations` leaves: pandas_udf reads them.
    run.__annotations__ = {"batches": Iterator[pd.Series], "return": Iterator[pd.DataFrame]}
    udf = F.pandas_udf(run, schema)  # type: ignore[call-overload]
    return df.withColumn("_out", udf(F.col(column.name)))


def predict_local(values, model: ResolvedModel, batch_size: int = 32, from_text: bool = False,
                  bf16: bool | str | None = None):
    """The same inference in this process, no Spark (the baseline bench_batch_inference compares
    to): ``sparktune.model.hf.Predictions`` of ``values``, texts when ``from_text``, else token ids."""
    from sparktune.model import hf

    core = hf.load(model.hf_dir, model.task.value, model.max_length, bf16=bf16)
    if from_text:
        return hf.predict(core, list(values), batch_size=batch_size)
    return hf.predict(core, ids=list(values), batch_size=batch_size)
