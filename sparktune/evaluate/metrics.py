"""Evaluation metrics, pure: no Spark, no MLflow.

``compute_metrics`` (labels and predictions in memory: training's end-of-run evaluation) and
the Spark evaluation both go through ``metrics_from_confusion``, so a metric means the same
everywhere. ``compute_lm_metrics`` gives token-weighted loss and perplexity.
"""

from __future__ import annotations

import math

from sparktune.errors import SparktuneError

__all__ = [
    "class_names",
    "compute_lm_metrics",
    "compute_metrics",
    "confusion_matrix_png",
    "format_metrics",
    "metrics_from_confusion",
]


def class_names(n_classes: int, label_names=None) -> list[str]:
    return [str(label_names[i]) if label_names and i < len(label_names) else str(i) for i in range(n_classes)]


def metrics_from_confusion(matrix, label_names=None, unanswered=None) -> dict:
    """Accuracy, macro and per-class precision/recall/F1 from a confusion matrix (rows: true,
    columns: predicted), with scikit-learn's conventions (zero_division=0, macro over all classes).

    ``unanswered``: per true class, rows that got no valid prediction (a hosted model's
    unparseable answer); they count as wrong: in the support and the total, never a hit.
    """
    import numpy as np

    cm = np.asarray(matrix, dtype=np.int64)
    missed = np.zeros(cm.shape[0], dtype=np.int64) if unanswered is None else np.asarray(unanswered, dtype=np.int64)
    total = int(cm.sum() + missed.sum())
    if total == 0:
        raise SparktuneError("no labelled rows to score: the split is empty or every label is -1 (unlabelled)")
    names = class_names(cm.shape[0], label_names)
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    support = cm.sum(axis=1) + missed
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "n": total,
        "accuracy": float(tp.sum() / total),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
        "per_class": {
            names[i]: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                       "support": int(support[i])}
            for i in range(len(names))
        },
        "labels": names,
        "confusion_matrix": cm.tolist(),
        **({"unanswered": int(missed.sum())} if missed.any() else {}),
    }


def compute_metrics(labels, predictions, probabilities=None, label_names=None) -> dict:
    """Metrics of class-id ``labels`` vs ``predictions`` (plus ROC AUC for two classes with
    ``probabilities``). Every class in ``label_names`` (or seen) gets a row and a column of the
    confusion matrix, even with no support. ``n`` is the number of rows (an int)."""
    import numpy as np
    from sklearn.metrics import confusion_matrix, roc_auc_score

    y_true = np.asarray(labels, dtype=np.int64)
    y_pred = np.asarray(predictions, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise SparktuneError(f"compute_metrics: {len(y_true)} labels but {len(y_pred)} predictions; "
                             "pass one of each per row")
    if len(y_true) == 0:
        raise SparktuneError("no labelled rows to score: the split is empty or every label is -1 (unlabelled)")
    # A prediction below 0 is no answer (e.g. an unparseable reply): a wrong row, not a class.
    answered = y_pred >= 0
    n_classes = max(len(label_names or ()), int(y_true.max()) + 1,
                    int(y_pred[answered].max()) + 1 if answered.any() else 0)
    matrix = confusion_matrix(y_true[answered], y_pred[answered], labels=list(range(n_classes))) if answered.any() \
        else np.zeros((n_classes, n_classes), dtype=np.int64)
    unanswered = np.bincount(y_true[~answered], minlength=n_classes)
    metrics = metrics_from_confusion(matrix, label_names, unanswered=unanswered)
    if probabilities is not None and n_classes == 2 and len(set(y_true.tolist())) == 2:
        probs = np.asarray([list(row) for row in probabilities], dtype=np.float64)
        metrics["roc_auc"] = float(roc_auc_score(y_true, probs[:, 1]))
    return metrics


def compute_lm_metrics(loss_sum: float, n_tokens: int, n_rows: int) -> dict:
    """Token-weighted eval loss and perplexity."""
    if n_tokens <= 0:
        raise SparktuneError("no tokens to score: every row of the split has fewer than 2 tokens")
    loss = float(loss_sum) / int(n_tokens)
    return {
        "n": int(n_rows),
        "n_tokens": int(n_tokens),
        "eval_loss": loss,
        "perplexity": float(math.exp(min(loss, 700))),
    }


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


def format_metrics(metrics: dict, per_class: dict | None = None, labels=None, confusion=None, rows: int = 0,
                   n_tokens: int = 0) -> str:
    lines = []
    if "eval_loss" in metrics:
        lines.append(f"rows scored   {rows}  ({n_tokens} predicted tokens)")
        lines.append(f"eval loss     {metrics['eval_loss']:.4f}")
        lines.append(f"perplexity    {metrics['perplexity']:.2f}")
        if "accuracy" not in metrics:
            return "\n".join(lines)
    else:
        # Instruction models have both: the prompts' perplexity above, the answers' scores below.
        lines.append(f"rows scored   {rows}")
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        if key in metrics:
            suffix = " (macro)" if key in ("precision", "recall", "f1") else ""
            lines.append(f"{key + suffix:<17} {metrics[key]:.4f}")
    if not per_class or not labels or confusion is None:
        return "\n".join(lines)
    width = max(8, max(len(name) for name in labels))
    lines.append("")
    lines.append(f"{'class':<{width}}  precision  recall      f1  support")
    for name, row in per_class.items():
        lines.append(f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}  "
                     f"{row['support']:7d}")
    lines.append("")
    lines.append("confusion matrix (rows: true, columns: predicted)")
    lines.append(" " * width + "  " + "  ".join(f"{name:>{width}}" for name in labels))
    for name, row in zip(labels, confusion):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)
