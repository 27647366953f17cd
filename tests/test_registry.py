"""Register: a real MLflow store reached only through a Tracker, models logged the way training
logs them (sparktune.train.modelio.log_model); aliases, lineage tags, promote-if-better, NaN
holders, load by alias."""

import math

import pandas as pd
import pytest
from evalkit import build_classifier

from sparktune.errors import SparktuneError


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    from sparktune.tracking import Tracker

    base = tmp_path_factory.mktemp("mlflow_reg")
    tracker = Tracker(f"sqlite:///{base}/mlflow.db", "registry-test")
    tracker.experiment_id()
    return tracker


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, minilm_path):
    return build_classifier(minilm_path, str(tmp_path_factory.mktemp("clf")))


def _training_run(tracker, hf_dir, f1, tmp_path):
    """A run shaped like `sparktune train`'s: params with data versions, test/f1, the model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparktune.train.modelio import log_model

    run_id = tracker.start_run("train")
    tracker.log_params(run_id, {"data.train_table": "/data/imdb_tokens", "data.train_table_version": "7",
                                "lr": "5e-5"})
    tracker.log_metrics(run_id, {"test/f1": f1})
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir)
    uri = log_model(model, AutoTokenizer.from_pretrained(hf_dir), task="classification",
                    save_dir=str(tmp_path / f"save_{run_id}"), tracker=tracker, run_id=run_id,
                    label_names=["neg", "pos"], max_length=128)
    tracker.end_run(run_id)
    return run_id, uri


def test_register_alias_promote_nan_holder_and_load(tracker, hf_dir, tmp_path):
    import mlflow
    import numpy as np

    from sparktune.model.resolve import resolve_model
    from sparktune.registry import register_model

    global_uri = mlflow.get_tracking_uri()
    client = tracker.client
    run1, uri1 = _training_run(tracker, hf_dir, 0.60, tmp_path)
    first = register_model(run1, "imdb-clf", tracker=tracker, alias="champion", promote_if_better="test/f1")
    assert first.promoted and first.version == "1" and first.source_model_uri == uri1
    v1 = client.get_model_version("imdb-clf", "1")
    # The logged artifact itself, not a converted copy.
    assert v1.tags["sparktune.model_uri"] == uri1
    # Registered as the LoggedModel's URI (linked to it), downloaded from the model's own artifacts.
    assert v1.source == uri1
    assert client.get_model_version_download_uri("imdb-clf", "1") == \
        client.get_logged_model(uri1.split("/")[-1]).artifact_location
    assert v1.tags["metric.test/f1"] == "0.6"
    assert v1.tags["data.data.train_table_version"] == "7"
    assert v1.tags["sparktune.run_id"] == run1

    run2, _ = _training_run(tracker, hf_dir, 0.50, tmp_path)
    worse = register_model(run2, "imdb-clf", tracker=tracker, alias="champion", promote_if_better="test/f1")
    assert worse.version == "2" and not worse.promoted and worse.alias_uri is None
    assert str(client.get_model_version_by_alias("imdb-clf", "champion").version) == "1"
    assert client.get_model_version("imdb-clf", "2").tags["sparktune.promoted"] == "false"

    # A NaN on the alias holder (a diverged evaluation) must not block every later promotion.
    client.log_metric(run1, "test/f1", float("nan"))
    assert math.isnan(client.get_run(run1).data.metrics["test/f1"])
    again = register_model(run2, "imdb-clf", tracker=tracker, alias="champion", promote_if_better="test/f1")
    assert again.promoted and again.previous_version == "1" and "non-finite" in again.reason
    assert str(client.get_model_version_by_alias("imdb-clf", "champion").version) == again.version

    # Sparktune never moved MLflow's global tracking URI.
    assert mlflow.get_tracking_uri() == global_uri

    resolved = resolve_model("models:/imdb-clf@champion", tracker, download_dir=str(tmp_path / "dl"))
    assert (resolved.run_id, resolved.model_version, resolved.registered_name) == (run2, again.version, "imdb-clf")
    # Pinned to the version's storage: the alias may move while executors load the model.
    assert resolved.fetch_uri == client.get_model_version_download_uri("imdb-clf", again.version)
    assert resolved.labels == ["neg", "pos"] and resolved.max_length == 128
    out = mlflow.pyfunc.load_model(resolved.local_dir).predict(pd.DataFrame({"text": ["A wonderful film", "Awful."]}))
    assert list(out.columns) == ["label", "prediction", "probabilities"]
    assert set(out["label"]) <= {"neg", "pos"}
    np.testing.assert_allclose([sum(p) for p in out["probabilities"]], 1.0, rtol=1e-6)


def test_register_explains_bad_input(tracker):
    from sparktune.cli import main
    from sparktune.registry import register_model

    with pytest.raises(SparktuneError, match="no such run"):
        register_model("0" * 32, "imdb-clf", tracker=tracker)
    empty = tracker.start_run("no model")
    tracker.log_metrics(empty, {"test/f1": 0.9})
    with pytest.raises(SparktuneError, match="no logged model"):
        register_model(empty, "imdb-clf", tracker=tracker)
    with pytest.raises(SparktuneError, match="has no such metric"):
        register_model(empty, "imdb-clf", tracker=tracker, promote_if_better="test/accuracy")
    tracker.client.log_metric(empty, "test/loss", float("nan"))
    with pytest.raises(SparktuneError, match="not a number to compare"):
        register_model(empty, "imdb-clf", tracker=tracker, promote_if_better="test/loss")
    assert main(["register", "--run-id", "0" * 32, "--name", "x", "--tracking-uri", tracker.tracking_uri]) == 2
