"""sparktune.compat: the version branches, checked on whichever stack runs the tests (today's in the
normal suite, Databricks Runtime 17.3 LTS ML's in ci/runtime_matrix.sh)."""

import os
import warnings

import pytest

from sparktune.compat import check_spark_version, delta_artifact, download_artifacts, from_pretrained_dtype
from sparktune.errors import SparktuneError

# What Maven Central publishes (repo1.maven.org/maven2/io/delta/<artifact>/maven-metadata.xml, read
# 2026-12): delta-spark_2.13 has 3.0.0-4.4.0; delta-spark_4.0_2.13 and delta-spark_4.1_2.13 start at
# 4.1.0; delta-spark_4.2_2.13 at 4.4.0. delta-spark_4.0_2.13:4.0.0 does not exist.
DELTA_COORDINATES = [
    ("4.0.0", "4.0.0", "io.delta:delta-spark_2.13:4.0.0"),  # Databricks Runtime 17.3 LTS's Spark
    ("4.0.1", "4.0.1", "io.delta:delta-spark_2.13:4.0.1"),
    ("4.0.1", "4.1.0", "io.delta:delta-spark_4.0_2.13:4.1.0"),
    ("4.1.0", "4.1.0", "io.delta:delta-spark_4.1_2.13:4.1.0"),
    ("4.1.4", "4.4.0", "io.delta:delta-spark_4.1_2.13:4.4.0"),  # the local extra's
    ("4.2.0", "4.4.0", "io.delta:delta-spark_4.2_2.13:4.4.0"),
]


@pytest.mark.parametrize("spark_version, delta_version, coordinate", DELTA_COORDINATES)
def test_delta_coordinate_names_a_published_jar(spark_version, delta_version, coordinate):
    assert delta_artifact(spark_version, delta_version) == coordinate


def test_delta_coordinate_is_what_the_installed_delta_asks_maven_for():
    """The hint and `python -m sparktune.spark` name the jar delta-spark's own pip helper resolves."""
    from delta import configure_spark_with_delta_pip
    from pyspark.sql import SparkSession

    from sparktune.spark import delta_maven_coordinate

    builder = configure_spark_with_delta_pip(SparkSession.Builder())
    assert builder._options["spark.jars.packages"] == delta_maven_coordinate()  # no JVM is started


@pytest.mark.parametrize("version", ["3.5.2", "3.4.0", "2.4.8"])
def test_spark_before_4_is_refused_with_what_is_supported(version):
    with pytest.raises(SparktuneError) as info:
        check_spark_version(version)
    message = str(info.value)
    assert f"Spark {version} is not supported" in message and "4.0 or newer" in message
    assert "Runtime 17.3 LTS ML" in message
    with pytest.raises(SparktuneError):
        delta_artifact(version, "3.3.2")


@pytest.mark.parametrize("version", ["4.0.0", "4.0.1", "4.1.4", "4.2.0.dev1"])
def test_spark_4_is_accepted(version):
    check_spark_version(version)


def test_the_cli_refuses_an_unsupported_spark_before_starting_one(monkeypatch, tmp_path, capsys, imdb_sample_path):
    """Runtime 16.4 LTS's Spark (3.5): the stage exits 2 with the message, no traceback, no session.

    pyspark's reported version is the one thing changed here: a real Spark 3.5 install is ~400 MB."""
    import pyspark
    from pyspark.sql import SparkSession

    from sparktune.cli import main

    monkeypatch.setattr(pyspark, "__version__", "3.5.2")
    active = SparkSession.getActiveSession()
    code = main(["ingest", "--source", imdb_sample_path, "--output", str(tmp_path / "raw")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Spark 3.5.2 is not supported" in err and "Traceback" not in err
    assert SparkSession.getActiveSession() is active and not (tmp_path / "raw").exists()


def test_from_pretrained_gets_the_dtype_under_the_installed_transformers_name(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig

    path = str(tmp_path / "tiny")
    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the renamed keyword warns on newer transformers
        model = AutoModelForSequenceClassification.from_pretrained(path, **from_pretrained_dtype(torch.bfloat16))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.fixture
def registered_model(tmp_path):
    """A model version in a real SQLite registry that is NOT the process's tracking/registry store."""
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'other.db'}"
    client = MlflowClient(uri, uri)
    experiment = client.create_experiment("compat", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "weights.txt").write_text("hello")
    client.log_artifacts(run.info.run_id, str(payload), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("compat-model")
    version = client.create_model_version("compat-model", f"runs:/{run.info.run_id}/model", run.info.run_id)
    assert mlflow.get_tracking_uri() != uri
    return uri, run.info.run_id, version.version


def test_download_uses_the_given_tracking_and_registry_uris_and_leaves_the_process_alone(
        registered_model, tmp_path, monkeypatch):
    import mlflow

    uri, run_id, version = registered_model
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'process.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), dict(os.environ))
    # A runs:/ URI resolves through the tracking store (MLflow 3.0 ignores tracking_uri= for it).
    # models:/ URIs of a local registry are not downloaded as such: resolve turns them into the
    # version's storage URI first (what this checks too).
    storage = mlflow.MlflowClient(uri, uri).get_model_version_download_uri("compat-model", version)
    for source in (f"runs:/{run_id}/model", storage):
        got = download_artifacts(source, str(tmp_path / "dst" / source.split(":")[0]), uri, uri)
        with open(os.path.join(got, "weights.txt"), encoding="utf-8") as handle:
            assert handle.read() == "hello", source
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), dict(os.environ)) == before

