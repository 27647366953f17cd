"""``train`` without Spark: plain torchrun, 2 gloo processes, rank 0 opening its own MLflow run."""

import os
import subprocess
import sys

import pytest
import yaml
from test_train_support import write_tokenized_table


@pytest.mark.timeout(300)
def test_plain_torchrun_two_processes(tmp_path, gpt2_tokenizer_path, mlflow_uri):
    import mlflow

    table = write_tokenized_table(tmp_path / "tok", gpt2_tokenizer_path, task="causal-lm", n_train=12, n_test=4,
                                  max_length=32)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"),
        "model": {"name": "tiny-gpt2", "config_overrides": {"model_type": "gpt2", "n_layer": 2, "n_embd": 64,
                                                            "n_head": 2, "n_positions": 64}},
        "data": {"table": str(table), "eval_split": ""},
        "train": {"batch_size": 2, "max_steps": 4, "learning_rate": 1e-3},
        "checkpoint": {"strategy": "no"},
        "mlflow": {"tracking_uri": mlflow_uri, "experiment": "torchrun", "system_metrics": False,
                   "log_model": False},
    }))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
         "-m", "sparktune.train.train", "--config", str(config), "train.max_steps=5"],
        capture_output=True, text=True, env=env, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2].startswith("run_id: ") and lines[-1] == "model_uri:"  # mlflow.log_model is off
    run_id = lines[-2].split(": ", 1)[1]
    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert len(client.search_runs([run.info.experiment_id])) == 1  # rank 1 opened none
    assert run.data.params["train.max_steps"] == "5"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4, 5]
    assert os.path.exists(tmp_path / "out" / "model" / "model.safetensors")
