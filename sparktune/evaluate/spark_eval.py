"""``sparktune evaluate`` and ``sparktune predict``: batch inference in Spark, metrics, MLflow, Delta.

``evaluate_model`` scores a labelled split and returns an ``EvaluateResult``; metrics are
aggregated in Spark (a confusion matrix, an exact ROC AUC by score groups, loss sums), so no
row reaches the driver. ``predict_table`` scores unlabelled text and writes a predictions table
(``PredictResult``). Both load the model on the executors from its MLflow URI.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from sparktune.errors import SparktuneError
from sparktune.evaluate.metrics import (
    class_names,
    compute_lm_metrics,
    confusion_matrix_png,
    format_metrics,
    metrics_from_confusion,
)
from sparktune.results import StageResult
from sparktune.settings import Stage, add_stage, option
from sparktune.tasks import TOKENIZED, Task
from sparktune.tracking import metric_key

__all__ = [
    "PREDICTIONS_COLUMNS",
    "PREDICT_COLUMNS",
    "EvaluateResult",
    "EvaluateSettings",
    "PredictResult",
    "PredictSettings",
    "add_cli",
    "confusion_counts",
    "evaluate_model",
    "evaluate_stage",
    "log_evaluation",
    "predict_stage",
    "predict_table",
]

PREDICTIONS_COLUMNS = ["row_id", "label", "prediction", "predicted_label", "probabilities", "model_uri",
                       "model_version"]
"""Columns of the table ``evaluate --predictions`` writes (classifiers)."""
PREDICT_COLUMNS = ["row_id", "text_sha256", "prediction", "predicted_label", "probabilities", "model_uri",
                   "model_version"]
"""Columns of the table ``sparktune predict`` writes for a classifier (``row_id`` null when the input has none)."""


@dataclass
class EvaluateResult(StageResult):
    """What ``sparktune evaluate`` measured, on which rows, with which model."""

    model_uri: str
    model_version: str
    task: Task
    table: str
    table_version: int
    split: str | None
    rows: int
    """Rows scored (a field, never an MLflow metric)."""
    metrics: dict = field(default_factory=dict)
    """accuracy, precision, recall, f1 (macro), roc_auc; or eval_loss, perplexity."""
    per_class: dict = field(default_factory=dict)
    labels: list = field(default_factory=list)
    confusion_matrix: list = field(default_factory=list)
    n_tokens: int = 0
    limit: int | None = None
    predictions_table: str | None = None
    predictions_version: int | None = None
    run_id: str | None = None
    phases: dict = field(default_factory=dict)
    """Wall seconds of the evaluation's parts: ``resolve_s`` (the model found and its files fetched
    on the driver), ``score_s`` (the Spark jobs: read, inference, metrics), ``log_s`` (MLflow)."""

    def summary(self) -> str:
        lines = [f"model  {self.model_uri}" + (f" (version {self.model_version})" if self.model_version else ""),
                 f"table  {self.table} (version {self.table_version}, split {self.split or 'all rows'})",
                 format_metrics(self.metrics, self.per_class, self.labels, self.confusion_matrix, self.rows,
                                self.n_tokens)]
        if self.predictions_table:
            lines.append(f"\npredictions written to {self.predictions_table} (version {self.predictions_version})")
        if self.run_id:
            lines.append(f"logged to MLflow run {self.run_id}")
        return "\n".join(lines)


@dataclass
class PredictResult(StageResult):
    model_uri: str
    model_version: str
    task: Task
    table: str
    table_version: int
    output: str
    output_version: int
    rows: int
    """Rows of the predictions table."""
    scored: int | None = None
    """Rows scored by this run (fewer than ``rows`` when only the changed source rows were; 0 when up to date)."""
    incremental_from: int | None = None
    """The source version the predictions reflected before this run, when only the rows changed since were scored."""

    def summary(self) -> str:
        if self.scored == 0:
            return (f"{self.output} (version {self.output_version}) already holds {self.model_uri}'s predictions "
                    f"for {self.table} version {self.table_version}; nothing to score")
        if self.incremental_from is not None:
            return (f"scored the {self.scored} rows of {self.table} changed from version {self.incremental_from} to "
                    f"{self.table_version} with {self.model_uri}\n"
                    f"predictions ({self.rows} rows) updated in {self.output} (version {self.output_version})")
        return (f"scored {self.rows} rows of {self.table} (version {self.table_version}) with {self.model_uri}\n"
                f"predictions written to {self.output} (version {self.output_version})")


def _select_rows(df, table: str, split: str | None, limit: int | None, labelled: bool):
    from pyspark.sql import functions as F

    if split:
        if TOKENIZED.split not in df.columns:
            raise SparktuneError(f"--split {split}: table {table} has no `split` column (columns: {df.columns}); "
                                 "pass --split '' to score every row")
        found = sorted(r[0] for r in df.select(TOKENIZED.split).distinct().collect() if r[0] is not None)
        if split not in found:
            raise SparktuneError(f"--split {split}: table {table} has splits {found}; pick one of them")
        df = df.where(F.col(TOKENIZED.split) == split)
    if labelled:
        if TOKENIZED.label not in df.columns:
            raise SparktuneError(f"table {table} has no `label` column (columns: {df.columns}); "
                                 "a classifier is scored against labels")
        df = df.where(F.col(TOKENIZED.label) >= 0)  # -1 marks unlabelled rows
    if limit:
        # Ordered, so two evaluations with the same --limit score the same rows (promote-if-better
        # compares models on them).
        if TOKENIZED.row_id not in df.columns:
            raise SparktuneError(f"--limit needs a `row_id` column to pick the same rows every time; table {table} "
                                 f"has {df.columns}")
        df = df.orderBy(TOKENIZED.row_id).limit(int(limit))
    return df


def _roc_auc(scored) -> float | None:
    """Exact ROC AUC of the positive class (id 1) in Spark: positives count the negatives scored
    below them, ties count half (scikit-learn's value)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    groups = scored.select(F.col("label"), F.element_at("probabilities", 2).alias("p")).groupBy("p").agg(
        F.sum((F.col("label") == 1).cast("long")).alias("pos"), F.sum((F.col("label") == 0).cast("long")).alias("neg"))
    below = Window.orderBy("p").rowsBetween(Window.unboundedPreceding, -1)
    ranked = groups.withColumn("neg_below", F.coalesce(F.sum("neg").over(below), F.lit(0)))
    row = ranked.agg(F.sum(F.col("pos") * (F.col("neg_below") + F.col("neg") * 0.5)), F.sum("pos"),
                     F.sum("neg")).first()
    wins, pos, neg = row[0], row[1], row[2]
    if not pos or not neg:
        return None
    return float(wins) / (float(pos) * float(neg))


def confusion_counts(scored, n_classes: int) -> list[list[int]]:
    """The confusion matrix of a DataFrame's ``label`` and ``prediction`` columns (class ids >= 0),
    counted in Spark: only its cells reach the driver."""
    cells = scored.groupBy("label", "prediction").count().collect()  # at most classes^2 rows
    n = max([n_classes] + [max(int(r["label"]), int(r["prediction"])) + 1 for r in cells])
    matrix = [[0] * n for _ in range(n)]
    for r in cells:
        matrix[int(r["label"])][int(r["prediction"])] = int(r["count"])
    return matrix


def log_evaluation(tracker, run_id: str, result: EvaluateResult, *, model_id: str | None = None,
                   dataset: tuple[str, str] | None = None) -> None:
    """Metrics as ``<split>/<name>`` (per class ``<split>/<name>/<class>``); table, version and
    row count as tags; the full report and the confusion matrix as artifacts.

    ``model_id``: the LoggedModel scored (the metrics are listed on it too); ``dataset``: the
    (name, digest) of the run's dataset input the metrics were computed on (``_log_test_input``)."""
    prefix = result.split or "eval"
    metrics = {metric_key(prefix, k): v for k, v in result.metrics.items()}
    for name, row in result.per_class.items():
        for key in ("precision", "recall", "f1"):
            metrics[metric_key(prefix, f"{key}/{name}")] = row[key]
    tracker.log_metrics(run_id, metrics, model_id=model_id, dataset=dataset)
    tracker.set_tags(run_id, {
        f"sparktune.{prefix}.table": result.table,
        f"sparktune.{prefix}.table_version": result.table_version,
        f"sparktune.{prefix}.rows": result.rows,
        f"sparktune.{prefix}.limit": result.limit or "",
        f"sparktune.{prefix}.model_uri": result.model_uri,
    })
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, f"{prefix}_metrics.json")
        with open(report, "w", encoding="utf-8") as handle:
            json.dump(result.to_dict(), handle, indent=2)
        tracker.log_artifact(run_id, report, "evaluation")
        if result.confusion_matrix:
            png = confusion_matrix_png(result.confusion_matrix, result.labels,
                                       os.path.join(tmp, f"{prefix}_confusion_matrix.png"),
                                       title=f"{prefix}: confusion matrix")
            tracker.log_artifact(run_id, png, "evaluation")


def _logged_model_id(tracker, resolved) -> str | None:
    """The LoggedModel (``m-...``) behind the scored model, when this MLflow store has it: a
    ``models:/m-...`` URI's, a registered version's, a run's model, or a downloaded folder's."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    candidate = None
    try:
        if resolved.registered_name and resolved.model_version:
            version = client.get_model_version(resolved.registered_name, resolved.model_version)
            source = str(version.source or "")
            candidate = getattr(version, "model_id", None) or (source[len("models:/"):]
                                                                if source.startswith("models:/m-") else None)
        elif str(resolved.model_version or "").startswith("m-"):
            candidate = resolved.model_version
        if candidate is None and resolved.run_id:
            from sparktune.registry import find_run_model

            candidate = find_run_model(client, resolved.run_id).model_id
        return client.get_logged_model(candidate).model_id if candidate else None
    except (MlflowException, SparktuneError):  # not in this store (a copied folder), or no model logged
        return None


def _log_test_input(spark, tracker, run_id: str, result: EvaluateResult, model_id: str | None,
                    model_input: bool) -> tuple[str, str]:
    """The scored table at its version as a dataset input of ``run_id`` (context ``testing`` for
    the test split, else the split's name), with the rows scored as its profile; the model as a
    model input when the run is not the model's own."""
    import pandas as pd

    from sparktune.tables import parse_table_ref, table_uri
    from sparktune.train.tracking import log_delta_input

    ref = parse_table_ref(result.table)
    split = result.split or "all"
    columns = {"row_id": pd.Series(dtype="string")}
    if result.task.has_labels:
        columns["label"] = pd.Series(dtype="int32")
    return log_delta_input(
        tracker, run_id, location=table_uri(spark, ref), version=result.table_version,
        name=f"{result.table}@v{result.table_version}:{split}", context="testing" if split == "test" else split,
        table_name=None if ref.is_path else ref.name, sample=pd.DataFrame(columns), targets="label", rows=result.rows,
        model_id=model_id if model_input else None)


def _evaluation_run(tracker, resolved, table: str) -> str:
    tags = {"sparktune.stage": "evaluate", "sparktune.model_uri": resolved.uri, "sparktune.table": table}
    experiment = None
    if resolved.run_id and tracker.run_exists(resolved.run_id):
        tags["sparktune.source_run_id"] = resolved.run_id
        experiment = tracker.client.get_experiment(tracker.get_run(resolved.run_id).info.experiment_id).name
    if resolved.model_version:
        tags["sparktune.model_version"] = resolved.model_version
    return tracker.start_run(f"evaluate {os.path.basename(resolved.uri.rstrip('/'))}", tags, experiment=experiment)


def evaluate_model(spark, model, table: str, *, tracker=None, split: str | None = "test",
                   predictions_table: str | None = None, batch_size: int = 32, log_to_mlflow: bool = True,
                   run_id: str | None = None, limit: int | None = None) -> EvaluateResult:
    """Score ``model`` (a URI, folder or ``ResolvedModel``) on ``table``'s ``split`` rows in Spark.

    Metrics go to ``run_id`` when given, else to the training run of a ``runs:/`` URI, else to a
    new run linked to the model's run.
    """

    from sparktune.inference import input_column, score_spark
    from sparktune.model.resolve import ResolvedModel, resolve_model
    from sparktune.tables import check_writes, read_snapshot, read_table
    from sparktune.tracking import Tracker

    check_writes(spark, "evaluate", tables={"--predictions": predictions_table}, inputs={"--table": table})
    tracker = tracker or Tracker()
    clock = time.perf_counter()
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model, tracker)
    resolved_s = time.perf_counter() - clock
    df = read_table(spark, table, what="evaluation table")
    source = read_snapshot(spark, table, what="evaluation table")  # one read for its version and uri
    source_version = source.version
    is_classifier = resolved.task.has_labels
    df = _select_rows(df, table, split, limit, labelled=is_classifier)
    column = input_column(df)
    if resolved.task is Task.INSTRUCTION:
        df = _instruction_prompts(df, table, column.is_text)
    scored = score_spark(df, resolved, tracker, column, batch_size=batch_size)
    lm_cached = None
    if resolved.task is Task.INSTRUCTION:
        # Scored once: the answers give the classifier metrics, the prompts' losses the perplexity.
        lm_cached = scored = scored.persist()
    base: dict[str, Any] = {"model_uri": resolved.uri, "model_version": resolved.version_label, "task": resolved.task,
            "table": table, "table_version": source_version, "split": split or None, "limit": limit}
    if is_classifier:
        result = _classifier_result(spark, scored, lm_cached, df, resolved, table, split, predictions_table,
                                    source_version, source.uri, base)
    else:
        lm = _lm_metrics(scored)
        result = EvaluateResult(rows=lm["n"], n_tokens=lm["n_tokens"],
                                metrics={"eval_loss": lm["eval_loss"], "perplexity": lm["perplexity"]}, **base)
    scored_s = time.perf_counter() - clock - resolved_s
    if log_to_mlflow:
        result.run_id = _log_evaluate(spark, tracker, resolved, table, result, run_id)
    result.phases = {"resolve_s": resolved_s, "score_s": scored_s,
                     "log_s": time.perf_counter() - clock - resolved_s - scored_s}
    return result


def _classifier_result(spark, scored, lm_cached, df, resolved, table: str, split: str | None,
                       predictions_table: str | None, source_version: int, source_uri: str,
                       base: dict) -> EvaluateResult:
    """A classifier's metrics from its scored rows (stored first when ``predictions_table``)."""
    from pyspark.sql import functions as F

    from sparktune.tables import read_table, write_table

    if predictions_table and TOKENIZED.row_id not in df.columns:
        raise SparktuneError(f"--predictions needs a `row_id` column to identify rows; table {table} has "
                             f"{df.columns}")
    names = F.array(*[F.lit(n) for n in resolved.labels]) if resolved.labels else None
    out = scored.select(
        (F.col("row_id").cast("string") if "row_id" in df.columns else F.lit(None).cast("string")).alias("row_id"),
        F.col("label").cast("int").alias("label"),
        F.col("_out.prediction").alias("prediction"),
        (F.element_at(names, F.col("_out.prediction") + 1) if names is not None
         else F.col("_out.prediction").cast("string")).alias("predicted_label"),
        F.col("_out.probabilities").alias("probabilities"),
        F.lit(resolved.uri).alias("model_uri"),
        F.lit(resolved.version_label).cast("string").alias("model_version"),
    )
    cached = None
    if predictions_table:
        # Write once, then read the table back: inference runs once and the metrics
        # describe exactly the rows that were stored.
        version = write_table(out, predictions_table, properties={
            "sparktune.model_uri": resolved.uri, "sparktune.source_table": source_uri,
            "sparktune.source_version": source_version, "sparktune.split": split or ""},
            user_metadata={"stage": "evaluate", "model_uri": resolved.uri, "source_table": table,
                           "source_version": source_version})
        base.update(predictions_table=predictions_table, predictions_version=version)
        out = read_table(spark, predictions_table)
    else:
        cached = out = out.persist()  # scored once, aggregated twice
    try:
        confusion = confusion_counts(out, len(resolved.labels))
        computed = metrics_from_confusion(confusion, resolved.labels)
        auc = _roc_auc(out) if len(confusion) == 2 else None
    finally:
        if cached is not None:
            cached.unpersist()
    metrics = {k: computed[k] for k in ("accuracy", "precision", "recall", "f1")}
    if auc is not None:
        metrics["roc_auc"] = auc
    n_tokens = 0
    if lm_cached is not None:
        lm = _lm_metrics(lm_cached)
        lm_cached.unpersist()
        metrics.update(eval_loss=lm["eval_loss"], perplexity=lm["perplexity"])
        n_tokens = lm["n_tokens"]
    result = EvaluateResult(rows=computed["n"], metrics=metrics, per_class=computed["per_class"],
                            labels=class_names(len(confusion), resolved.labels), confusion_matrix=confusion,
                            n_tokens=n_tokens, **base)
    return result


def _log_evaluate(spark, tracker, resolved, table: str, result: EvaluateResult, run_id: str | None) -> str:
    """Log ``result`` to ``run_id``, else the training run of a ``runs:/`` URI, else a new run
    linked to the model's run (ended here); returns the run logged to."""
    created = False
    if run_id is None and resolved.uri.startswith("runs:/") and resolved.run_id:
        run_id = resolved.run_id
    if run_id is None:
        run_id, created = _evaluation_run(tracker, resolved, table), True
    model_id = _logged_model_id(tracker, resolved)
    dataset = _log_test_input(spark, tracker, run_id, result, model_id, model_input=run_id != resolved.run_id)
    log_evaluation(tracker, run_id, result, model_id=model_id, dataset=dataset)
    if created:
        tracker.end_run(run_id)
    return run_id


def _lm_metrics(scored) -> dict:
    """Token-weighted loss and perplexity from the per-row sums of ``_out``."""
    from pyspark.sql import functions as F

    row = scored.select(F.sum("_out.loss_sum").alias("loss"), F.sum("_out.n_predicted").alias("tokens"),
                        F.count(F.lit(1)).alias("rows")).first()
    return compute_lm_metrics(row["loss"] or 0.0, int(row["tokens"] or 0), int(row["rows"] or 0))


def _instruction_prompts(df, table: str, is_text: bool):
    """An instruction model continues prompts: a tokenized instruction table's rows are cut to
    their prompt (``input_ids[:prompt_tokens]``); raw text is made into prompts on the executors."""
    from pyspark.sql import functions as F

    if is_text:
        return df
    if TOKENIZED.prompt_tokens not in df.columns:
        raise SparktuneError(f"table {table} has input_ids but no {TOKENIZED.prompt_tokens} column: an instruction "
                             "model scores the prompts of a table from `sparktune tokenize --task instruction`, or "
                             "raw text (a table with a `text` column)")
    return df.withColumn(TOKENIZED.input_ids, F.slice(TOKENIZED.input_ids, 1, F.col(TOKENIZED.prompt_tokens)))


def _text_hash(column):
    from pyspark.sql import functions as F

    return F.sha2(F.coalesce(column.cast("string"), F.lit("")), 256)


def predict_table(spark, model, table: str, output: str, *, tracker=None, text_column: str | None = None,
                  batch_size: int = 32, full: bool = False) -> PredictResult:
    """Score every row of ``table`` (unlabelled text or a tokenized table) and write ``output``.

    The predictions table holds one row per source row, all from one model version. When
    ``output`` already holds this model version's predictions for an older version of the same
    source (recorded in its latest commit) and the source has a ``row_id``, only the rows changed
    since are scored: new rows are added, the rows of changed or deleted source rows replaced or
    dropped, in one commit (``sparktune.incremental``); the result equals a full run's. Another
    model, another input column, a source without ``row_id`` or ``full`` score every row.
    """
    from pyspark.sql import functions as F

    from sparktune.incremental import apply_changes, history_unreadable, source_changes
    from sparktune.inference import input_column, score_spark
    from sparktune.model.resolve import ResolvedModel, resolve_model
    from sparktune.tables import check_writes, read_snapshot, read_table, table_version, write_table
    from sparktune.tracking import Tracker

    check_writes(spark, "predict", tables={"--output": output}, inputs={"--table": table})
    tracker = tracker or Tracker()
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model, tracker)
    df = read_table(spark, table, what="input table")
    source = read_snapshot(spark, table, what="input table")  # one read for its version, id and uri
    source_version = source.version
    column = input_column(df, text_column)
    provenance = _predict_provenance(spark, resolved, table, source.table_id, source_version, column.name)
    base = None if full or TOKENIZED.row_id not in df.columns else _predicted_version(spark, output, provenance)
    if base == source_version:
        return PredictResult(resolved.uri, resolved.version_label, resolved.task, table, source_version, output,
                             table_version(spark, output), read_table(spark, output).count(), scored=0)
    changes = None
    if base is not None and base < source_version:
        inputs = [TOKENIZED.row_id, column.name] + ([TOKENIZED.prompt_tokens] if TOKENIZED.prompt_tokens in df.columns
                                                    and not column.is_text else [])
        try:
            changes = source_changes(spark, table, base, source_version, inputs)
            df = changes.inserted if changes.inserted is not None else df.join(changes.keys, TOKENIZED.row_id,
                                                                               "left_semi")
        except Exception as exc:  # noqa: BLE001  (only an unreadable history is handled; the rest re-raised)
            if not history_unreadable(exc):
                raise
            changes = None
    if resolved.task is Task.INSTRUCTION:
        df = _instruction_prompts(df, table, column.is_text)
    scored = score_spark(df, resolved, tracker, column, batch_size=batch_size)
    row_id = (F.col(TOKENIZED.row_id).cast("string") if TOKENIZED.row_id in df.columns
              else F.lit(None).cast("string")).alias("row_id")
    digest = _text_hash(F.col(column.name)) if column.is_text else F.lit(None).cast("string")
    common = [row_id, digest.alias("text_sha256")]
    tail = [F.lit(resolved.uri).alias("model_uri"), F.lit(resolved.version_label).cast("string").alias("model_version")]
    if resolved.task.has_labels:
        names = F.array(*[F.lit(n) for n in resolved.labels]) if resolved.labels else None
        out = scored.select(*common, F.col("_out.prediction").alias("prediction"),
                            (F.element_at(names, F.col("_out.prediction") + 1) if names is not None
                             else F.col("_out.prediction").cast("string")).alias("predicted_label"),
                            F.col("_out.probabilities").alias("probabilities"), *tail)
    else:
        out = scored.select(*common, (F.col("_out.loss_sum") / F.greatest(F.col("_out.n_predicted"), F.lit(1)))
                            .alias("loss"), F.col("_out.n_predicted").alias("n_tokens"), *tail)
    if changes is not None:
        try:
            applied = apply_changes(output, out, changes, dict(provenance, incremental_from=str(base)))
        except Exception as exc:  # noqa: BLE001  (only an unreadable history is handled; the rest re-raised)
            if not history_unreadable(exc):
                raise
            return predict_table(spark, resolved, table, output, tracker=tracker, text_column=text_column,
                                 batch_size=batch_size, full=True)
        return PredictResult(resolved.uri, resolved.version_label, resolved.task, table, source_version, output,
                             applied.version, read_table(spark, output).count(), scored=applied.inserted,
                             incremental_from=base)
    version = write_table(out, output, properties={
        "sparktune.model_uri": resolved.uri, "sparktune.model_version": resolved.version_label,
        "sparktune.source_table": source.uri, "sparktune.source_version": source_version},
        user_metadata=provenance)
    rows = read_table(spark, output).count()
    return PredictResult(resolved.uri, resolved.version_label, resolved.task, table, source_version, output,
                         version, rows, scored=rows)


def _predict_provenance(spark, resolved, table: str, source_id: str, source_version: int, column: str) -> dict:
    """What a predictions table's content reflects (its commit's userMetadata): the model version,
    the source (location, Delta table id, version) and the input column."""
    from sparktune import __version__

    return {"stage": "predict", "model_uri": resolved.uri, "model_version": str(resolved.version_label),
            "source_table": table, "source_table_id": source_id, "source_version": source_version,
            "input_column": column, "sparktune_version": __version__}


def _predicted_version(spark, output: str, provenance: dict) -> int | None:
    """The source version ``output``'s predictions reflect, when predict wrote its latest commit with
    the same model version, source and input column; else None (score every row)."""
    from sparktune.incremental import last_provenance
    from sparktune.redact import redact_mapping
    from sparktune.tables import table_exists

    if not table_exists(spark, output):
        return None
    written, _ = last_provenance(spark, output)
    if written is None:
        return None
    state = ("source_version", "incremental_from")
    if {k: v for k, v in written.items() if k not in state} != {
            k: v for k, v in redact_mapping(provenance).items() if k not in state}:
        return None
    try:
        return int(written["source_version"])
    except (KeyError, TypeError, ValueError):
        return None


# CLI -------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class EvaluateSettings:
    """``sparktune evaluate``'s flags and the pipeline's ``evaluate`` section."""

    model: str = option("", cli_required=True)
    """models:/<name>@<alias>, models:/<name>/<version>, models:/m-<id>, runs:/<run_id>/model or a folder (the
    pipeline scores the model train logged)."""
    table: str = option("", cli_required=True)
    """Delta table (path or name) with input_ids or text, and label (the pipeline reads tokenize.output)."""
    split: str = "test"
    """The value of the `split` column to score; empty: every row."""
    limit: int | None = None
    """Score only the first N rows of the split by row_id (the same rows every time); empty: all of them."""
    predictions_table: str = option("", aliases=("--predictions",), metavar="TABLE")
    """Delta table for the per-row predictions; empty: none written."""
    batch_size: int = 32
    """Rows per forward pass in each Spark task."""
    run_id: str = ""
    """MLflow run to log to; empty: the training run of a runs:/ URI, else a new run (the pipeline logs to train's
    run)."""
    mlflow: bool = True
    """Log the metrics, the confusion matrix and the predictions table's version to MLflow."""

    def __post_init__(self):
        from sparktune.config import raise_if, require

        problems: list = []
        require(problems, self.limit is None or self.limit >= 1, "limit", f"must be >= 1 or empty, found {self.limit}")
        require(problems, self.batch_size >= 1, "batch_size", f"must be >= 1, found {self.batch_size}")
        raise_if(problems)


def evaluate_stage(spark, settings: EvaluateSettings, tracker=None) -> EvaluateResult:
    """The evaluate stage: ``sparktune evaluate`` and the pipeline's fourth step."""
    s = settings
    return evaluate_model(spark, s.model, s.table, tracker=tracker, split=s.split or None,
                          predictions_table=s.predictions_table or None, batch_size=s.batch_size,
                          log_to_mlflow=s.mlflow, run_id=s.run_id or None, limit=s.limit)


@dataclass(frozen=True, kw_only=True)
class PredictSettings:
    """``sparktune predict``'s flags."""

    model: str
    """models:/<name>@<alias>, models:/<name>/<version>, models:/m-<id>, runs:/<run_id>/model or a folder."""
    table: str
    """Delta table (path or name) with a text column or input_ids."""
    output: str
    """Delta table (path or name) to write the predictions to."""
    text_column: str = ""
    """Column holding the text; empty: input_ids, else text."""
    batch_size: int = 32
    """Rows per forward pass in each Spark task."""
    full: bool = False
    """Score every row, even when output holds this model's predictions for an older version of table (by default
    only the rows changed since are scored)."""

    def __post_init__(self):
        from sparktune.config import raise_if, require

        problems: list = []
        require(problems, self.batch_size >= 1, "batch_size", f"must be >= 1, found {self.batch_size}")
        raise_if(problems)


def predict_stage(spark, settings: PredictSettings, tracker=None) -> PredictResult:
    """The predict stage: ``sparktune predict``."""
    s = settings
    return predict_table(spark, s.model, s.table, s.output, tracker=tracker, text_column=s.text_column or None,
                         batch_size=s.batch_size, full=s.full)


def add_cli(subparsers) -> None:
    add_stage(subparsers, Stage(
        "evaluate", EvaluateSettings, evaluate_stage, tracker=True, experiment="sparktune-evaluate",
        help="score a model on a Delta table: accuracy/P/R/F1 (or perplexity), MLflow, predictions table",
        description="Run the model over a tokenized (or raw `text`) Delta table in Spark and report metrics."))
    add_stage(subparsers, Stage(
        "predict", PredictSettings, predict_stage, tracker=True,
        help="score unlabelled text with a model and write a predictions table",
        description="Batch inference in Spark: every row of --table, predictions to --output."))
