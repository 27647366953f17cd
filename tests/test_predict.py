"""Predict: unlabelled reviews scored in Spark (local[2]) by a model the executors fetch from its
MLflow URI themselves, written as a predictions Delta table."""

import glob
import hashlib
import os
import tempfile

import numpy as np
import pandas as pd
import pytest
from evalkit import build_classifier


@pytest.fixture(scope="module")
def logged(tmp_path_factory, minilm_path):
    """A classifier logged as the one sparktune artifact into a real SQLite store."""
    from sparktune.model import artifact
    from sparktune.tracking import Tracker

    base = tmp_path_factory.mktemp("predict")
    tracker = Tracker(f"sqlite:///{base}/mlflow.db", "predict-test")
    hf = build_classifier(minilm_path, str(base / "hf"))
    run_id = tracker.start_run("train")
    uri = artifact.log_model(hf, "classification", tracker=tracker, run_id=run_id, max_length=96)
    tracker.end_run(run_id)
    return tracker, uri


@pytest.fixture(scope="module")
def reviews(spark, tmp_path_factory, imdb_sample_path):
    from sparktune.tables import write_table

    texts = pd.read_parquet(os.path.join(imdb_sample_path, "test.parquet"))["text"].head(30).tolist()
    path = str(tmp_path_factory.mktemp("raw") / "new_reviews")
    write_table(spark.createDataFrame([(t, "web") for t in texts], "text string, source string"), path)
    return path, texts


def test_predict_unlabelled_reviews_with_executors_fetching_the_model(spark, logged, reviews, tmp_path):
    import mlflow

    from sparktune.evaluate import PREDICT_COLUMNS, predict_table
    from sparktune.model.resolve import _cache_root, resolve_model
    from sparktune.tables import read_table

    tracker, uri = logged
    table, texts = reviews
    out = str(tmp_path / "predictions")
    result = predict_table(spark, uri, table, out, tracker=tracker)
    assert result.rows == len(texts) and result.output_version == 0
    assert result.model_version == uri.split("/")[-1]
    frame = read_table(spark, out).toPandas()
    assert list(frame.columns) == PREDICT_COLUMNS
    assert frame["row_id"].isna().all()  # the input has none: rows are identified by their text's hash
    by_hash = frame.set_index("text_sha256")
    expected = mlflow.pyfunc.load_model(resolve_model(uri, tracker).local_dir).predict(pd.DataFrame({"text": texts}))
    for text, (_, row) in zip(texts, expected.iterrows()):
        got = by_hash.loc[hashlib.sha256(text.encode()).hexdigest()]
        assert got["predicted_label"] == row["label"] and got["prediction"] == row["prediction"]
        np.testing.assert_allclose(got["probabilities"], row["probabilities"], atol=1e-5)
    assert set(frame["model_uri"]) == {uri}

    # The executors downloaded the model by URI into their own cache, not from a driver path.
    source = resolve_model(uri, tracker).fetch_uri
    assert source and source.startswith("file://")
    key = hashlib.sha256(f"{tracker.tracking_uri}|{source}".encode()).hexdigest()[:24]
    # Python workers get the executor's scratch space (blockmgr-*) as SPARK_LOCAL_DIRS; the driver has none.
    assert "SPARK_LOCAL_DIRS" not in os.environ and _cache_root().startswith(tempfile.gettempdir())
    found = glob.glob(os.path.join(tempfile.gettempdir(), "*", "sparktune-models", key, ".complete"))
    assert found, "no executor cached the model under its SPARK_LOCAL_DIRS"


def test_predict_cli(spark, logged, reviews, tmp_path, capsys):
    import json

    from sparktune.cli import main

    tracker, uri = logged
    table, texts = reviews
    out = str(tmp_path / "cli_predictions")
    assert main(["predict", "--model", uri, "--table", table, "--output", out, "--text-column", "text",
                 "--tracking-uri", tracker.tracking_uri, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rows"] == len(texts) and result["output"] == out
    assert main(["predict", "--model", uri, "--table", table, "--output", out, "--text-column", "review",
                 "--tracking-uri", tracker.tracking_uri]) == 2
    assert "--text-column review" in capsys.readouterr().err


def test_stages_use_no_spark_context():
    """Spark Connect has no sparkContext or RDDs: the inference stages use the DataFrame API only."""
    from sparktune import inference
    from sparktune.evaluate import spark_eval

    for module in (inference, spark_eval):
        with open(module.__file__) as handle:
            source = handle.read()
        assert "sparkContext" not in source.replace("no ``sparkContext``", "") and ".rdd" not in source


def test_predict_on_a_growing_table_scores_only_the_changed_rows(spark, logged, reviews, tmp_path):
    """Issue 21: the same model on a grown/changed source (change data feed on) scores only new and
    changed rows, drops deleted ones, one commit each, and equals a full run row for row."""
    from sparktune.evaluate import predict_table
    from sparktune.tables import read_table, table_version, write_table

    tracker, uri = logged
    _, texts = reviews
    table = str(tmp_path / "reviews")
    rows = [(f"r{i:02d}", t) for i, t in enumerate(texts)]
    write_table(spark.createDataFrame(rows[:20], "row_id string, text string"), table)
    spark.sql(f"ALTER TABLE delta.`{table}` SET TBLPROPERTIES ('delta.enableChangeDataFeed' = 'true')")
    out = str(tmp_path / "predictions")
    first = predict_table(spark, uri, table, out, tracker=tracker)
    assert first.scored == first.rows == 20 and first.incremental_from is None

    spark.createDataFrame(rows[20:24], "row_id string, text string").createOrReplaceTempView("new_reviews")
    spark.sql(f"INSERT INTO delta.`{table}` SELECT * FROM new_reviews")
    added = 4
    grown = predict_table(spark, uri, table, out, tracker=tracker)
    assert grown.incremental_from == first.table_version and grown.scored == added
    assert grown.output_version == first.output_version + 1 and grown.rows == 20 + added

    spark.sql(f"UPDATE delta.`{table}` SET text = 'A dull, lifeless film. I want my money back.' WHERE row_id = 'r03'")
    spark.sql(f"DELETE FROM delta.`{table}` WHERE row_id IN ('r05', 'r06')")
    changed = predict_table(spark, uri, table, out, tracker=tracker)
    assert changed.incremental_from == grown.table_version and changed.scored == 1
    assert changed.output_version == grown.output_version + 1 and changed.rows == 18 + added
    again = predict_table(spark, uri, table, out, tracker=tracker)
    assert again.scored == 0 and again.output_version == changed.output_version
    assert table_version(spark, out) == changed.output_version

    full = predict_table(spark, uri, table, str(tmp_path / "full"), tracker=tracker)
    columns = ["row_id", "text_sha256", "prediction", "predicted_label", "model_uri", "model_version"]
    got = read_table(spark, out).toPandas().sort_values("row_id").reset_index(drop=True)
    want = read_table(spark, full.output).toPandas().sort_values("row_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(got[columns], want[columns])
    np.testing.assert_allclose(np.stack(got["probabilities"]), np.stack(want["probabilities"]), atol=1e-5)
