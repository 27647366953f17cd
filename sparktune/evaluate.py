"""``sparktune evaluate``: score a model on a Delta table, in Spark; metrics, MLflow, a predictions table.

For training code (the end-of-training evaluation uses the same functions):

* ``compute_metrics(labels, predictions, probabilities=None, label_names=None)`` -> dict, pure;
* ``evaluate_model(spark, model_uri, table, split=..., predictions_table=None, mlflow_run_id=None)``
  runs inference in Spark, computes metrics, logs them to MLflow and returns them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile

from sparktune.errors import SparktuneError

__all__ = [
    "compute_metrics",
    "compute_lm_metrics",
    "evaluate_model",
    "log_metrics_to_mlflow",
    "confusion_matrix_png",
    "format_metrics",
    "add_cli",
    "PREDICTIONS_COLUMNS",
]

PREDICTIONS_COLUMNS = ["row_id", "label", "prediction", "probabilities", "model_uri", "model_version"]


def compute_metrics(labels, predictions, probabilities=None, label_names=None) -> dict:
    """Accuracy, macro and per-class precision/recall/F1 and the confusion matrix (scikit-learn).

    ``labels`` and ``predictions`` are class ids; every class in ``label_names`` (or seen in
    either list) gets a row and a column of the confusion matrix, even with no support.
    """
    import numpy as np
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

    y_true = np.asarray(labels, dtype=np.int64)
    y_pred = np.asarray(predictions, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise SparktuneError(f"compute_metrics: {len(y_true)} labels but {len(y_pred)} predictions; pass one of each per row")
    if len(y_true) == 0:
        raise SparktuneError("no labelled rows to score: the split is empty or every label is -1 (unlabelled)")
    n_classes = max(len(label_names or ()), int(y_true.max()) + 1, int(y_pred.max()) + 1)
    names = [str(label_names[i]) if label_names and i < len(label_names) else str(i) for i in range(n_classes)]
    ids = list(range(n_classes))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average="macro", zero_division=0)
    metrics = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(mp),
        "recall": float(mr),
        "f1": float(mf),
        "per_class": {
            names[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i in ids
        },
        "labels": names,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }
    if probabilities is not None and n_classes == 2 and len(set(y_true.tolist())) == 2:
        probs = np.asarray([list(row) for row in probabilities], dtype=np.float64)
        metrics["roc_auc"] = float(roc_auc_score(y_true, probs[:, 1]))
    return metrics


def compute_lm_metrics(loss_sums, counts) -> dict:
    """Token-weighted eval loss and perplexity over rows (``n`` rows, ``n_tokens`` predicted tokens)."""
    import numpy as np

    total_tokens = int(np.sum(counts))
    if total_tokens == 0:
        raise SparktuneError("no tokens to score: every row of the split has fewer than 2 tokens")
    loss = float(np.sum(loss_sums) / total_tokens)
    return {"n": int(len(counts)), "n_tokens": total_tokens, "eval_loss": loss, "perplexity": float(math.exp(min(loss, 700)))}


def confusion_matrix_png(matrix, labels, path: str, title: str = "Confusion matrix") -> str:
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(labels), 1.2 + 1.1 * len(labels)), dpi=100)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels=labels)
    ax.set_yticks(range(len(labels)), labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > threshold else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def format_metrics(metrics: dict) -> str:
    lines = []
    if "eval_loss" in metrics:
        lines.append(f"rows scored   {metrics['n']}  ({metrics['n_tokens']} predicted tokens)")
        lines.append(f"eval loss     {metrics['eval_loss']:.4f}")
        lines.append(f"perplexity    {metrics['perplexity']:.2f}")
        return "\n".join(lines)
    lines.append(f"rows scored   {metrics['n']}")
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        if key in metrics:
            suffix = " (macro)" if key in ("precision", "recall", "f1") else ""
            lines.append(f"{key + suffix:<17} {metrics[key]:.4f}")
    width = max(8, max(len(name) for name in metrics["labels"]))
    lines.append("")
    lines.append(f"{'class':<{width}}  precision  recall      f1  support")
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}  {row['support']:7d}")
    lines.append("")
    lines.append("confusion matrix (rows: true, columns: predicted)")
    lines.append(" " * width + "  " + "  ".join(f"{name:>{width}}" for name in metrics["labels"]))
    for name, row in zip(metrics["labels"], metrics["confusion_matrix"]):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def _metric_name(name: str) -> str:
    # MLflow metric keys allow letters, digits, _ - . / and spaces only.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def log_metrics_to_mlflow(metrics: dict, prefix: str, run_id: str, extra_params: dict | None = None) -> None:
    """Log ``metrics`` into ``run_id`` as ``<prefix>_accuracy`` etc., plus the matrix as JSON and PNG."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    flat = {f"{prefix}_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    for name, row in (metrics.get("per_class") or {}).items():
        for key in ("precision", "recall", "f1"):
            flat[f"{prefix}_{key}_{_metric_name(name)}"] = float(row[key])
    import time

    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    params = [Param(k, str(v)[:6000]) for k, v in (extra_params or {}).items() if v is not None]
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in flat.items()], params=params)
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, f"{prefix}_metrics.json")
        with open(report, "w", encoding="utf-8") as handle:
            json.dump(metrics, handle, indent=2)
        client.log_artifact(run_id, report, "evaluation")
        if "confusion_matrix" in metrics:
            png = confusion_matrix_png(metrics["confusion_matrix"], metrics["labels"], os.path.join(tmp, f"{prefix}_confusion_matrix.png"),
                                       title=f"{prefix}: confusion matrix")
            client.log_artifact(run_id, png, "evaluation")


def _artifact_location(experiment: str) -> str | None:
    """Beside a local SQLite store's database (as `sparktune train` does), not ./mlruns in the cwd."""
    import re

    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    root = os.path.join(os.path.dirname(os.path.abspath(uri[len("sqlite:///"):])), "mlartifacts")
    return "file://" + os.path.join(root, re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment).strip("_") or "experiment")


def _evaluation_run(resolved, table: str) -> str:
    """A new run for an evaluation that has no training run to write into, linked to the model's run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment_id = None
    if resolved.run_id:
        try:
            experiment_id = client.get_run(resolved.run_id).info.experiment_id
        except Exception:
            experiment_id = None
    if experiment_id is None:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "sparktune-evaluate")
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name, artifact_location=_artifact_location(name))
    tags = {"sparktune.stage": "evaluate", "sparktune.model_uri": resolved.uri, "sparktune.table": table}
    if resolved.run_id:
        tags["sparktune.source_run_id"] = resolved.run_id
    if resolved.model_version:
        tags["sparktune.model_version"] = resolved.model_version
    run = client.create_run(experiment_id, tags=tags, run_name=f"evaluate {os.path.basename(resolved.uri.rstrip('/'))}")
    return run.info.run_id


def evaluate_model(
    spark,
    model_uri,
    table: str,
    split: str | None = "test",
    predictions_table: str | None = None,
    batch_size: int = 32,
    log_to_mlflow: bool = True,
    mlflow_run_id: str | None = None,
    limit: int | None = None,
) -> dict:
    """Score ``model_uri`` on ``table`` (its ``split`` rows) in Spark; returns the metrics.

    ``model_uri`` may also be a ``ResolvedModel``. Metrics go to ``mlflow_run_id`` when given,
    else to the training run of a ``runs:/`` URI, else to a new evaluation run linked to the
    model's run. The returned dict has ``mlflow_run_id`` and, with a predictions table,
    ``predictions_table`` and ``predictions_version``.
    """
    from pyspark.sql import functions as F

    from sparktune.inference import CLASSIFICATION, ResolvedModel, predict_spark, resolve_model
    from sparktune.tables import read_table, table_version, write_table

    resolved = model_uri if isinstance(model_uri, ResolvedModel) else resolve_model(model_uri)
    df = read_table(spark, table, what="evaluation table")
    source_version = table_version(spark, table)
    if split:
        if "split" not in df.columns:
            raise SparktuneError(
                f"--split {split}: table {table} has no `split` column (columns: {df.columns}); "
                "pass --split '' to score every row"
            )
        found = sorted(r["split"] for r in df.select("split").distinct().collect() if r["split"] is not None)
        if split not in found:
            raise SparktuneError(f"--split {split}: table {table} has splits {found}; pick one of them")
        df = df.where(F.col("split") == split)
    if limit:
        df = df.limit(int(limit))
    is_classifier = resolved.task == CLASSIFICATION
    if is_classifier:
        if "label" not in df.columns:
            raise SparktuneError(f"table {table} has no `label` column (columns: {df.columns}); a classifier is scored against labels")
        df = df.where(F.col("label") >= 0)  # -1 marks unlabelled rows
    if predictions_table and is_classifier and "row_id" not in df.columns:
        raise SparktuneError(f"--predictions needs a `row_id` column to identify rows; table {table} has {df.columns}")

    scored = predict_spark(df, resolved, batch_size=batch_size)
    result: dict = {}
    if is_classifier:
        out = scored.select(
            F.col("row_id").cast("string").alias("row_id") if "row_id" in df.columns else F.lit(None).cast("string").alias("row_id"),
            F.col("label").cast("int").alias("label"),
            F.col("_out.prediction").alias("prediction"),
            F.col("_out.probabilities").alias("probabilities"),
            F.lit(resolved.uri).alias("model_uri"),
            F.lit(resolved.model_version or resolved.run_id).cast("string").alias("model_version"),
        )
        if predictions_table:
            # Write once, then read the table back: inference runs once and the metrics
            # describe exactly the rows that were stored.
            version = write_table(
                out,
                predictions_table,
                properties={
                    "sparktune.model_uri": resolved.uri,
                    "sparktune.source_table": table,
                    "sparktune.source_version": source_version,
                    "sparktune.split": split or "",
                },
                user_metadata={"stage": "evaluate", "model_uri": resolved.uri, "source_table": table, "source_version": source_version},
            )
            result.update(predictions_table=predictions_table, predictions_version=version)
            out = read_table(spark, predictions_table)
        rows = out.select("label", "prediction", "probabilities").toPandas()
        metrics = compute_metrics(rows["label"], rows["prediction"], rows["probabilities"].tolist(), resolved.labels)
    else:
        rows = scored.select("_out.loss_sum", "_out.n_predicted").toPandas()
        metrics = compute_lm_metrics(rows["loss_sum"].to_numpy(), rows["n_predicted"].to_numpy())
    metrics.update(result)
    metrics["model_uri"] = resolved.uri
    metrics["table"] = table
    metrics["table_version"] = source_version
    metrics["split"] = split or None

    if log_to_mlflow:
        from mlflow.tracking import MlflowClient

        run_id = mlflow_run_id
        created = False
        if run_id is None and resolved.uri.startswith("runs:/") and resolved.run_id:
            run_id = resolved.run_id
        if run_id is None:
            run_id, created = _evaluation_run(resolved, table), True
        prefix = split or "eval"
        log_metrics_to_mlflow(
            {k: v for k, v in metrics.items() if k not in ("table_version", "predictions_version")},
            prefix,
            run_id,
            extra_params={f"{prefix}_table": table, f"{prefix}_table_version": source_version}
            if created or mlflow_run_id is None
            else None,
        )
        if created:
            MlflowClient().set_terminated(run_id)
        metrics["mlflow_run_id"] = run_id
    return metrics


def _run(args) -> int:
    from sparktune.registry import use_tracking_uri
    from sparktune.spark import get_spark

    use_tracking_uri(args.tracking_uri)
    spark = get_spark()
    metrics = evaluate_model(
        spark,
        args.model,
        args.table,
        split=args.split or None,
        predictions_table=args.predictions,
        batch_size=args.batch_size,
        log_to_mlflow=not args.no_mlflow,
        mlflow_run_id=args.run_id,
        limit=args.limit,
    )
    if args.json:
        print(json.dumps(metrics, sort_keys=True))
    else:
        print(f"model  {metrics['model_uri']}")
        print(f"table  {metrics['table']} (version {metrics['table_version']}, split {metrics['split'] or 'all rows'})")
        print(format_metrics(metrics))
        if metrics.get("predictions_table"):
            print(f"\npredictions written to {metrics['predictions_table']} (version {metrics['predictions_version']})")
        if metrics.get("mlflow_run_id"):
            print(f"logged to MLflow run {metrics['mlflow_run_id']}")
    sys.stdout.flush()
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score a model on a Delta table: accuracy/P/R/F1 (or perplexity), MLflow, predictions table",
        description="Run the model over a tokenized (or raw `text`) Delta table in Spark and report metrics.",
    )
    p.add_argument("--model", required=True, help="model folder, runs:/<run_id>/model, models:/<name>@<alias> or models:/m-<id>")
    p.add_argument("--table", required=True, help="Delta table (path or name) with input_ids or text, and label")
    p.add_argument("--split", default="test", help="value of the `split` column to score (default test; '' for all rows)")
    p.add_argument("--predictions", metavar="TABLE", help="write a predictions Delta table here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default 32)")
    p.add_argument("--limit", type=int, default=None, help="score at most this many rows (smoke tests)")
    p.add_argument("--run-id", default=None, help="MLflow run to log metrics to (default: the model's training run for runs:/ URIs, else a new run)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: as `sparktune train`)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=_run)
