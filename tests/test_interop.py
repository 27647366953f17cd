"""Our outputs, loaded with the tools people load them with (issue 17): plain transformers on the
model folder, Spark SQL's SHOW TBLPROPERTIES on every table, MLflow's dataset, LoggedModel and
registry APIs, ``mlflow.pyfunc.spark_udf`` on the registered model, and polars / DuckDB /
delta-rs on every table.

One real pipeline, once per module: ingest (1,200 training reviews, so that the training set is
bigger than the 1,000-row sample MLflow's dataset schema is taken from) -> tokenize (MiniLM, 64
tokens, far below the tokenizer's 512) -> train (two steps, TorchDistributor) -> register ->
evaluate with a predictions table. Tables are named by relative paths, as a user types them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from evalkit import tiny_classifier_config

from sparktune.tasks import TOKENIZED

MAX_LENGTH = 64
TRAIN_ROWS = 1200
TEST_ROWS = 40
NAME = "interop-clf"


@dataclass
class Pipeline:
    base: str
    tables: dict
    """role -> the relative path the stages were given (raw, quarantine, ids, predictions)."""
    tracker: object
    train_run: str
    model_uri: str
    registered: object
    evaluation: object
    test_texts: pd.DataFrame


def _source_files(sample_dir: str, folder: str) -> None:
    """Split files (train.parquet, test.parquet) of distinct short reviews."""
    os.makedirs(folder)
    for split, rows in (("train", TRAIN_ROWS), ("test", TEST_ROWS)):
        sample = pd.read_parquet(os.path.join(sample_dir, f"{split}.parquet"))
        picks = [sample.iloc[i % len(sample)] for i in range(rows)]
        # Long enough that 64 tokens cut most of them: truncation decides the answers.
        pd.DataFrame({"text": [f"{r.text[:700]} (copy {i})" for i, r in enumerate(picks)],
                      "label": [int(r.label) for r in picks]}).to_parquet(os.path.join(folder, f"{split}.parquet"))


@pytest.fixture(scope="module")
def pipeline(spark, tmp_path_factory, minilm_path, imdb_sample_path):
    minilm_path = str(minilm_path)
    from sparktune.evaluate.spark_eval import evaluate_model
    from sparktune.ingest import ingest
    from sparktune.registry import register_model
    from sparktune.tokenize import tokenize_table
    from sparktune.tracking import Tracker
    from sparktune.train.distribute import run_training

    base = tmp_path_factory.mktemp("interop")
    _source_files(imdb_sample_path, str(base / "reviews"))
    tables = {"raw": "./lake/raw", "quarantine": "./lake/raw_quarantine", "ids": "./lake/ids",
              "predictions": "./lake/scored"}
    uri = f"sqlite:///{base}/mlflow.db"
    tracker = Tracker(uri, "interop")
    tracker.experiment_id()
    cwd = os.getcwd()
    os.chdir(base)  # relative table paths, as typed; provenance must not keep them relative
    try:
        ingest(spark, "./reviews", tables["raw"])
        tokenize_table(spark, tables["raw"], tables["ids"], minilm_path, max_length=MAX_LENGTH)
        cfg = tiny_classifier_config(str(base / "out"), minilm_path, tables["ids"], uri, "interop")
        trained = run_training(cfg, spark)
        registered = register_model(trained.run_id, NAME, tracker=tracker, alias="champion")
        evaluation = evaluate_model(spark, registered.alias_uri, tables["ids"], tracker=tracker, split="test",
                                    predictions_table=tables["predictions"])
    finally:
        os.chdir(cwd)
    test = pd.read_parquet(base / "reviews" / "test.parquet")
    return Pipeline(str(base), tables, tracker, trained.run_id, trained.model_uri, registered, evaluation, test)


def _abs(pipeline: Pipeline, role: str) -> str:
    return os.path.normpath(os.path.join(pipeline.base, pipeline.tables[role]))


def _model_dir(pipeline: Pipeline) -> str:
    from sparktune.model.resolve import resolve_model

    resolved = resolve_model(pipeline.registered.alias_uri, pipeline.tracker,
                             download_dir=os.path.join(pipeline.base, "download"))
    return resolved.local_dir


def test_plain_transformers_pipeline_agrees_with_the_pyfunc(pipeline):
    """transformers.pipeline on the artifact's model folder gives the pyfunc's labels and
    probabilities, for texts far longer than the 64 tokens the model was trained on."""
    import mlflow
    from transformers import AutoTokenizer
    from transformers import pipeline as hf_pipeline

    local = _model_dir(pipeline)
    folder = os.path.join(local, "artifacts", "model")  # where docs/deploy.md says the weights are
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.model_max_length == MAX_LENGTH
    assert (tokenizer.truncation_side, tokenizer.padding_side) == ("right", "right")
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}

    # Texts the model sees only the head of: the saved tokenizer's length decides the answers.
    texts = [t for t in pipeline.test_texts["text"] if len(tokenizer(t)["input_ids"]) > 2 * MAX_LENGTH][:16]
    assert len(texts) >= 8
    ours = mlflow.pyfunc.load_model(local).predict(pd.DataFrame({"text": texts}))
    classify = hf_pipeline("text-classification", model=folder, truncation=True, top_k=None, batch_size=4,
                           device="cpu")
    theirs = classify(texts)
    probs = np.array([[next(s["score"] for s in row if s["label"] == name) for name in ("negative", "positive")]
                      for row in theirs])
    np.testing.assert_allclose(probs, np.array(ours["probabilities"].tolist()), atol=2e-5)
    assert [max(row, key=lambda s: s["score"])["label"] for row in theirs] == ours["label"].tolist()


def test_show_tblproperties_shows_provenance_unredacted_and_qualified(spark, pipeline):
    """What an analyst types: every sparktune property of every table, unredacted; the paths in
    them fully qualified, readable from another working directory."""
    from deltalake import DeltaTable

    from sparktune.tables import table_properties

    for role in pipeline.tables:
        location = _abs(pipeline, role)
        shown = {r["key"]: r["value"] for r in spark.sql(f"SHOW TBLPROPERTIES delta.`{location}`").collect()}
        ours = {k: v for k, v in shown.items() if k.startswith("sparktune.")}
        assert ours, f"{role}: no sparktune properties"
        redacted = [k for k, v in ours.items() if "redacted" in v]
        assert not redacted, f"{role}: SHOW TBLPROPERTIES redacts {redacted}"
        assert ours == {k: v for k, v in table_properties(spark, location).items() if k.startswith("sparktune.")}
    ids = {r["key"]: r["value"] for r in spark.sql(f"SHOW TBLPROPERTIES delta.`{_abs(pipeline, 'ids')}`").collect()}
    assert ids[TOKENIZED.prop_stage] == TOKENIZED.stage_name
    assert ids[TOKENIZED.prop_max_length] == str(MAX_LENGTH) and len(ids[TOKENIZED.prop_tokenizer_fingerprint]) == 16
    assert os.path.basename(ids[TOKENIZED.prop_tokenizer].rstrip("/")) == "model"  # the MiniLM folder

    raw = table_properties(spark, _abs(pipeline, "raw"))
    predictions = table_properties(spark, _abs(pipeline, "predictions"))
    for role, value in (("ids", ids[TOKENIZED.prop_source]), ("raw", raw["sparktune.quarantine"]),
                        ("predictions", predictions["sparktune.source_table"])):
        assert value.startswith("file:/"), f"{role}: {value!r} is not a fully qualified URI"
        # Usable from anywhere: delta-rs (no Spark, another working directory) opens it.
        assert DeltaTable(value).version() >= 0, role
    assert raw["sparktune.source"] == os.path.join(pipeline.base, "reviews")


def test_mlflow_lineage_datasets_logged_model_and_registry(pipeline):
    """MLflow's own APIs see the lineage: the training input at Delta version 0 with its real row
    count, the test set as the evaluation's input, test metrics on the LoggedModel, and the
    registered version linked to that LoggedModel."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    client = pipeline.tracker.client
    model_id = pipeline.model_uri.removeprefix("models:/")
    assert model_id.startswith("m-")

    train_inputs = client.get_run(pipeline.train_run).inputs.dataset_inputs
    training = next(d for d in train_inputs if any(t.key == "mlflow.data.context" and t.value == "training"
                                                    for t in d.tags))
    source = json.loads(training.dataset.source)
    assert source["delta_table_version"] == 0  # the table's first version, not dropped
    assert source["path"] == "file://" + _abs(pipeline, "ids")
    assert json.loads(training.dataset.profile)["num_rows"] == TRAIN_ROWS

    evaluation = client.get_run(pipeline.evaluation.run_id)
    assert pipeline.evaluation.run_id != pipeline.train_run
    tested = [d for d in evaluation.inputs.dataset_inputs
              if any(t.key == "mlflow.data.context" and t.value == "testing" for t in d.tags)]
    assert len(tested) == 1
    assert json.loads(tested[0].dataset.profile)["num_rows"] == pipeline.evaluation.rows == TEST_ROWS
    assert json.loads(tested[0].dataset.source)["delta_table_version"] == pipeline.evaluation.table_version
    assert [m.model_id for m in evaluation.inputs.model_inputs or []] == [model_id]

    on_model = {m.key: m for m in client.get_logged_model(model_id).metrics or []}
    assert on_model["test/accuracy"].value == pytest.approx(pipeline.evaluation.metrics["accuracy"])
    assert on_model["test/f1"].dataset_digest == tested[0].dataset.digest

    version = client.get_model_version(NAME, pipeline.registered.version)
    assert version.source == pipeline.model_uri  # models:/m-..., not a file:// copy location
    assert getattr(version, "model_id", None) in (None, model_id)  # kept by Unity Catalog; OSS stores drop it
    listed = json.loads(client.get_logged_model(model_id).tags[MLFLOW_MODEL_VERSIONS])
    assert {"name": NAME, "version": pipeline.registered.version} in [
        {"name": v["name"], "version": str(v["version"])} for v in listed]
    assert client.get_model_version_download_uri(NAME, pipeline.registered.version) == \
        client.get_logged_model(model_id).artifact_location


def test_spark_udf_on_the_registered_model_matches_the_predictions_table(spark, pipeline):
    import mlflow
    from pyspark.sql import functions as F

    from sparktune.tracking import process_uris

    with process_uris(str(pipeline.tracker.tracking_uri), None):  # put back as it was (unset), not as it read
        udf = mlflow.pyfunc.spark_udf(spark, pipeline.registered.alias_uri, env_manager="local",
                                      result_type="label string, prediction bigint, probabilities array<double>")
    raw = spark.read.format("delta").load(_abs(pipeline, "raw")).where(F.col("split") == "test")
    scored = raw.select("row_id", udf(F.struct(F.col("text").alias("text"))).alias("out")).toPandas()
    table = spark.read.format("delta").load(_abs(pipeline, "predictions")).toPandas()
    both = scored.merge(table, on="row_id")
    assert len(both) == len(table) == TEST_ROWS
    assert (both["out"].map(lambda o: o["label"]) == both["predicted_label"]).all()
    np.testing.assert_allclose(np.array(both["out"].map(lambda o: list(o["probabilities"])).tolist()),
                               np.array(both["probabilities"].map(list).tolist()), atol=2e-5)


def test_polars_duckdb_and_delta_rs_read_every_table(spark, pipeline):
    from deltalake import DeltaTable

    polars = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    for role in pipeline.tables:
        location = _abs(pipeline, role)
        expected = spark.read.format("delta").load(location).count()
        assert len(DeltaTable(location).to_pyarrow_table()) == expected, role
        assert polars.read_delta(location).height == expected, role
        connection = duckdb.connect()
        try:
            found = connection.execute(f"SELECT count(*) FROM delta_scan('{location}')").fetchone()[0]
        except duckdb.Error as exc:  # the delta extension is downloaded on first use: no network here
            if "extension" not in str(exc).lower():
                raise
            connection.register("scanned", DeltaTable(location).to_pyarrow_dataset())
            found = connection.execute("SELECT count(*) FROM scanned").fetchone()[0]
        finally:
            connection.close()
        assert found == expected, role
