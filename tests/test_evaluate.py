"""Evaluate: metrics equal scikit-learn's, Spark inference equals in-process inference, the
predictions table round-trips through Spark and deltalake, metrics land in MLflow as
`test/<name>` with counts as tags, and --limit picks the same rows every time."""

import math

import numpy as np
import pytest
from evalkit import (
    build_classifier,
    build_tiny_gpt2,
    tokenized_frame,
    write_tokenized_table,
)

from sparktune.errors import SparktuneError


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    from sparktune.tracking import Tracker

    base = tmp_path_factory.mktemp("mlflow_eval")
    tracker = Tracker(f"sqlite:///{base}/mlflow.db", "evaluate-test")
    tracker.experiment_id()
    return tracker


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, minilm_path):
    return build_classifier(minilm_path, str(tmp_path_factory.mktemp("clf")))


@pytest.fixture(scope="module")
def token_table(spark, tmp_path_factory, imdb_sample_path, classifier):
    frame = tokenized_frame(imdb_sample_path, classifier, max_length=128, n=60)
    frame.loc[frame.index[-5:], "label"] = -1  # unlabelled rows are not scored
    # Written in reverse row_id order, so a --limit that did not order would take other rows.
    frame = frame.iloc[::-1].reset_index(drop=True)
    path = str(tmp_path_factory.mktemp("tables") / "tokenized")
    return write_tokenized_table(spark, frame, path), frame


def test_compute_metrics_equals_sklearn():
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_score,
        recall_score,
    )

    from sparktune.evaluate import compute_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(0, 3, 200))
    m = compute_metrics(y, p, label_names=["a", "b", "c"])
    assert m["n"] == 200
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["precision"] == pytest.approx(precision_score(y, p, average="macro"))
    assert m["recall"] == pytest.approx(recall_score(y, p, average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert m["per_class"]["b"]["f1"] == pytest.approx(f1_score(y, p, average=None)[1])
    assert m["confusion_matrix"] == confusion_matrix(y, p).tolist()
    with pytest.raises(SparktuneError, match="no labelled rows"):
        compute_metrics([], [])


def test_evaluate_writes_predictions_and_logs_to_mlflow(spark, tracker, classifier, token_table, tmp_path):
    from deltalake import DeltaTable
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    from sparktune.evaluate import PREDICTIONS_COLUMNS, evaluate_model
    from sparktune.inference import predict_local
    from sparktune.model.resolve import resolve_model
    from sparktune.tables import read_table

    table, frame = token_table
    preds_path = str(tmp_path / "predictions")
    result = evaluate_model(spark, classifier, table, tracker=tracker, split="test", predictions_table=preds_path)

    labelled = frame[frame.label >= 0]
    assert result.rows == len(labelled) == 55
    assert "n" not in result.metrics and "rows" not in result.metrics
    out = read_table(spark, preds_path).toPandas().sort_values("row_id").reset_index(drop=True)
    assert list(read_table(spark, preds_path).columns) == PREDICTIONS_COLUMNS
    assert dict(read_table(spark, preds_path).dtypes)["probabilities"] == "array<double>"
    via_rs = DeltaTable(preds_path).to_pandas().sort_values("row_id").reset_index(drop=True)
    assert via_rs["row_id"].tolist() == out["row_id"].tolist()
    assert via_rs["prediction"].tolist() == out["prediction"].tolist()
    assert set(out["model_uri"]) == {classifier}
    assert out["predicted_label"].tolist() == [["negative", "positive"][p] for p in out["prediction"]]

    # Spark's distributed inference equals the same model run in this process.
    expected = labelled.sort_values("row_id").reset_index(drop=True)
    local = predict_local([list(x) for x in expected["input_ids"]], resolve_model(classifier))
    np.testing.assert_allclose(np.stack(out["probabilities"].map(np.asarray)), local.probabilities, atol=1e-5)
    assert out["label"].tolist() == expected["label"].tolist()

    m = result.metrics
    assert m["accuracy"] == pytest.approx(accuracy_score(out["label"], out["prediction"]))
    assert m["f1"] == pytest.approx(f1_score(out["label"], out["prediction"], average="macro"))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(out["label"], np.stack(out["probabilities"])[:, 1]))

    run = tracker.get_run(result.run_id)
    assert run.data.metrics["test/accuracy"] == pytest.approx(m["accuracy"])
    assert run.data.metrics["test/f1/positive"] == pytest.approx(result.per_class["positive"]["f1"])
    assert not [k for k in run.data.metrics if k.endswith(("/n", "/rows", "version"))]
    assert run.data.tags["sparktune.test.rows"] == "55"
    assert run.data.tags["sparktune.test.table_version"] == str(result.table_version)
    assert run.data.tags["sparktune.model_uri"] == classifier
    artifacts = {a.path for a in tracker.client.list_artifacts(result.run_id, "evaluation")}
    assert {"evaluation/test_confusion_matrix.png", "evaluation/test_metrics.json"} <= artifacts


def test_limit_scores_the_same_first_rows_every_time(spark, tracker, classifier, token_table, tmp_path):
    from sparktune.evaluate import evaluate_model
    from sparktune.tables import read_table

    table, frame = token_table
    first = sorted(frame[frame.label >= 0]["row_id"])[:10]
    for i in range(2):
        path = str(tmp_path / f"limited{i}")
        evaluate_model(spark, classifier, table, tracker=tracker, predictions_table=path, limit=10,
                       log_to_mlflow=False)
        assert sorted(r[0] for r in read_table(spark, path).select("row_id").collect()) == first


def test_cli_json_and_bad_split(spark, tracker, classifier, token_table, capsys):
    import json

    from sparktune.cli import main

    table, _ = token_table
    assert main(["evaluate", "--model", classifier, "--table", table, "--json", "--no-mlflow", "--limit", "20",
                 "--tracking-uri", tracker.tracking_uri]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"accuracy", "precision", "recall", "f1"} <= set(result["metrics"])
    assert result["rows"] == 20 and result["limit"] == 20 and result["task"] == "classification"
    assert main(["evaluate", "--model", classifier, "--table", table, "--split", "validation", "--no-mlflow"]) == 2
    assert "has splits ['test']" in capsys.readouterr().err


def test_bad_model_uri_is_explained(tmp_path):
    from sparktune.model.resolve import resolve_model

    with pytest.raises(SparktuneError, match="no such folder"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(SparktuneError, match="neither an MLmodel file nor a config.json"):
        resolve_model(str(tmp_path))


def test_causal_lm_loss_and_perplexity(spark, tracker, tmp_path, gpt2_tokenizer_path, imdb_sample_path):
    import torch
    from transformers import AutoModelForCausalLM

    from sparktune.evaluate import evaluate_model

    model_dir = build_tiny_gpt2(gpt2_tokenizer_path, str(tmp_path / "gpt2"))
    frame = tokenized_frame(imdb_sample_path, gpt2_tokenizer_path, max_length=64, n=12)
    table = write_tokenized_table(spark, frame, str(tmp_path / "lm_tokens"))
    result = evaluate_model(spark, model_dir, table, tracker=tracker, split="test", log_to_mlflow=False)

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in frame["input_ids"]:
            t = torch.tensor([ids])
            total += model(input_ids=t, labels=t).loss.item() * (len(ids) - 1)
            count += len(ids) - 1
    assert result.rows == 12 and result.n_tokens == count
    assert result.metrics["eval_loss"] == pytest.approx(total / count, rel=1e-4)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-3)
