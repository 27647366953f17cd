"""Register: a real MLflow store, models logged the way training logs them (transformers
flavor) and as sparktune's pyfunc; aliases, lineage tags, promote-if-better, load by alias."""


import pandas as pd
import pytest

from evalkit import build_classifier, mlflow_store
from sparktune.errors import SparktuneError


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with mlflow_store(tmp_path_factory.mktemp("mlflow_reg"), "registry-test") as uri:
        yield uri


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, minilm_path):
    return build_classifier(minilm_path, str(tmp_path_factory.mktemp("clf")))


def _training_run(hf_dir, f1, flavor, tmp_path):
    """A run shaped like `sparktune train`'s: params with data versions, a Delta input, a model."""
    import mlflow
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with mlflow.start_run() as run:
        mlflow.log_params({"data.train_table": "/data/imdb_tokens", "data.train_table_version": "7", "lr": "5e-5"})
        mlflow.log_metric("test_f1", f1)
        if flavor == "transformers":
            from sparktune.train.modelio import log_model

            model = AutoModelForSequenceClassification.from_pretrained(hf_dir)
            uri = log_model(model, AutoTokenizer.from_pretrained(hf_dir), task="classification",
                            save_dir=str(tmp_path / f"save_{run.info.run_id}"))
        else:
            from sparktune.pyfunc_model import log_pyfunc_model

            uri = log_pyfunc_model(hf_dir)
    return run.info.run_id, uri


def test_register_alias_promote_and_load(store, hf_dir, tmp_path):
    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient

    from sparktune.inference import resolve_model
    from sparktune.registry import register_model
    from sparktune.serve import prepare_serving_model

    client = MlflowClient()
    run1, _ = _training_run(hf_dir, 0.60, "transformers", tmp_path)
    first = register_model(run1, "imdb-clf", alias="champion", promote_if_better="test_f1")
    assert first["promoted"] and first["version"] == "1"
    v1 = client.get_model_version("imdb-clf", "1")
    assert v1.tags["metric.test_f1"] == "0.6"
    assert v1.tags["data.data.train_table_version"] == "7"
    assert v1.tags["sparktune.run_id"] == run1

    run2, _ = _training_run(hf_dir, 0.50, "pyfunc", tmp_path)
    worse = register_model(run2, "imdb-clf", alias="champion", promote_if_better="test_f1")
    assert worse["version"] == "2" and not worse["promoted"]
    assert str(client.get_model_version_by_alias("imdb-clf", "champion").version) == "1"
    assert client.get_model_version("imdb-clf", "2").tags["sparktune.promoted"] == "false"

    run3, _ = _training_run(hf_dir, 0.70, "pyfunc", tmp_path)
    better = register_model(run3, "imdb-clf", alias="champion", promote_if_better="test_f1")
    assert better["promoted"] and better["previous_version"] == "1"
    assert str(client.get_model_version_by_alias("imdb-clf", "champion").version) == "3"

    # Load by alias: MLflow's loader, and sparktune's resolver (what evaluate and serve use).
    loaded = mlflow.pyfunc.load_model("models:/imdb-clf@champion")
    out = loaded.predict(pd.DataFrame({"text": ["A wonderful film", "Awful."]}))
    assert list(out.columns) == ["label", "prediction", "probabilities"]
    np.testing.assert_allclose([sum(p) for p in out["probabilities"]], 1.0, rtol=1e-6)
    resolved = resolve_model("models:/imdb-clf@champion", download_dir=str(tmp_path / "dl"))
    assert (resolved.run_id, resolved.model_version, resolved.flavor) == (run3, "3", "sparktune-pyfunc")

    # The transformers-flavor version serves all class probabilities once converted.
    v1_dir = prepare_serving_model("models:/imdb-clf/1", str(tmp_path / "serve_v1"))
    v1_out = mlflow.pyfunc.load_model(v1_dir).predict(pd.DataFrame({"text": ["A wonderful film"]}))
    np.testing.assert_allclose(v1_out["probabilities"][0], out["probabilities"][0], atol=1e-5)


def test_register_explains_bad_input(store, hf_dir, tmp_path):
    import mlflow

    from sparktune.registry import register_model

    with pytest.raises(SparktuneError, match="no such run"):
        register_model("0" * 32, "imdb-clf")
    with mlflow.start_run() as empty:
        mlflow.log_metric("test_f1", 0.9)
    with pytest.raises(SparktuneError, match="no logged model"):
        register_model(empty.info.run_id, "imdb-clf")
    with pytest.raises(SparktuneError, match="has no such metric"):
        register_model(empty.info.run_id, "imdb-clf", promote_if_better="test_accuracy")
