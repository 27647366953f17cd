"""Evaluation: pure metrics (``metrics``) and Spark batch scoring with MLflow logging (``spark_eval``).

``from sparktune.evaluate import compute_metrics`` is what training's end-of-run evaluation uses;
``evaluate_model`` / ``predict_table`` are ``sparktune evaluate`` / ``sparktune predict``.
"""

from sparktune.evaluate.metrics import (
    compute_lm_metrics,
    compute_metrics,
    confusion_matrix_png,
    format_metrics,
    metrics_from_confusion,
)
from sparktune.evaluate.spark_eval import (
    PREDICT_COLUMNS,
    PREDICTIONS_COLUMNS,
    EvaluateResult,
    EvaluateSettings,
    PredictResult,
    PredictSettings,
    add_cli,
    confusion_counts,
    evaluate_model,
    evaluate_stage,
    log_evaluation,
    predict_stage,
    predict_table,
)

__all__ = [
    "PREDICTIONS_COLUMNS",
    "PREDICT_COLUMNS",
    "EvaluateResult",
    "PredictResult",
    "EvaluateSettings",
    "PredictSettings",
    "add_cli",
    "compute_lm_metrics",
    "compute_metrics",
    "confusion_counts",
    "confusion_matrix_png",
    "evaluate_model",
    "evaluate_stage",
    "format_metrics",
    "log_evaluation",
    "metrics_from_confusion",
    "predict_stage",
    "predict_table",
]
