"""Peak memory of one training rank's data path, for a small and a large corpus (issue 13).

For each corpus size a synthetic tokenized Delta table is written with delta-rs (numpy/pyarrow,
no Spark), dealt into ``--world`` shard files, and then a *fresh process* plays rank 0: it
imports torch (as a rank does), reads its shard (``sparktune.train.data.read_shard``: Parquet
row groups into a memory-mapped flat cache), builds the length-grouping sampler over all its
rows and collates ``--steps`` batches of ``--batch-size`` rows. Its peak RSS
(``VmHWM`` in ``/proc/self/status``; ``ru_maxrss`` would include the parent's peak) is what is
compared: same batch size, same steps, only the corpus differs. Target: growth <= 10% from 100k to 2M rows.

Shards are written by ``sparktune.staging.stage_training_data`` (Spark, ``local[2]``) for sizes
up to ``--spark-max-rows``, and above it by ``--direct`` dealing in numpy with the same layout
(same columns, ``_local`` order, length-sorted windows dealt round-robin): Spark staging of 2M
rows on a 2-core machine shared with other jobs takes too long for a benchmark run.

    python bench/bench_rank_memory.py                      # 100k and 2M rows, world 2
    python bench/bench_rank_memory.py --quick              # 5k and 50k rows, no Spark (a test runs this)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import cast

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # tokenized_fixture: the synthetic table


def _rss_mb() -> float:
    """Peak resident memory of this process so far (MB).

    ``VmHWM`` of the process's own address space: ``getrusage``'s ``ru_maxrss`` would not do
    here, as Linux carries the parent's peak over a fork/exec into the child's figure.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_shards_direct(table, world: int, seed: int, window_rows: int, folder: str) -> list:
    """Deal ``table``'s rows into ``world`` shard files as staging does (numpy instead of Spark)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = table.num_rows
    lengths = table.column("n_tokens").to_numpy()
    rng = np.random.default_rng(seed)
    windows = max(1, -(-n // (window_rows * world)))
    window = rng.integers(0, windows, n)
    # Windows in order, longest rows first within each: the global position of every row.
    order = np.lexsort((-lengths, window))
    extra = (-n) % world
    order = np.concatenate([order, order[:extra]])  # uneven=pad: wrap around to the first rows
    paths = []
    for rank in range(world):
        rows = order[rank::world]
        shard = table.take(pa.array(rows)).select(["row_id", "label", "input_ids", "n_tokens"])
        shard = shard.add_column(0, "_local", pa.array(np.arange(len(rows), dtype=np.int64)))
        path = os.path.join(folder, f"rank={rank}", "part-0.parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(shard, path, row_group_size=8192, compression="zstd")
        paths.append([path])
        del shard
    return paths


def stage_with_spark(table_path: str, world: int, seed: int, folder: str) -> list:
    from sparktune.spark import get_spark
    from sparktune.staging import stage_training_data

    spark = get_spark(master="local[2]", conf={"spark.sql.shuffle.partitions": "4"})
    stage = stage_training_data(spark, table_path, 0, "train", world, seed=seed, staging_dir=folder, num_labels=2)
    return [stage.shard_paths(r) for r in range(world)]


def measure_rank(paths: list, cache: str, batch_size: int, steps: int, seed: int) -> dict:
    """Rank 0's data path in this process; returns RSS figures (MB) and timings."""
    import torch  # noqa: F401  (a rank has torch loaded: part of its baseline)
    from torch.utils.data import DataLoader, Dataset

    from sparktune.train.data import DynamicPaddingCollator, LengthGroupedBatchSampler, ShardDataset, read_shard

    baseline = _rss_mb()
    t0 = time.perf_counter()
    rows = read_shard(paths, cache_dir=cache, has_labels=True)
    read_s = time.perf_counter() - t0
    after_read = _rss_mb()
    sampler = LengthGroupedBatchSampler(rows.lengths, batch_size, seed=seed)
    collator = DynamicPaddingCollator(0, "classification")
    # ShardDataset is map-style by duck typing (sparktune.train.data does not import torch)
    loader: DataLoader = DataLoader(cast(Dataset, ShardDataset(rows)), batch_sampler=sampler, collate_fn=collator)
    t0 = time.perf_counter()
    tokens = 0
    for step, batch in enumerate(loader):
        tokens += int(batch["attention_mask"].sum())
        if step + 1 >= steps:
            break
    iterate_s = time.perf_counter() - t0
    return {"rows": len(rows), "baseline_mb": baseline, "after_read_mb": after_read, "peak_mb": _rss_mb(),
            "read_s": read_s, "batches_per_s": steps / iterate_s, "tokens": tokens}


def run_case(rows: int, args, work: str) -> dict:
    from deltalake import write_deltalake
    from tokenized_fixture import tokenized_arrow

    case = os.path.join(work, f"rows{rows}")
    table_path = os.path.join(case, "table")
    t0 = time.perf_counter()
    table = tokenized_arrow(rows, seed=args.seed, min_len=16, max_len=args.max_len)
    write_deltalake(table_path, table, mode="overwrite")
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    spark = rows <= args.spark_max_rows and not args.direct
    if spark:
        del table
        paths = stage_with_spark(table_path, args.world, args.seed, os.path.join(case, "staging"))
    else:
        from sparktune.staging import DEFAULT_WINDOW_ROWS

        paths = write_shards_direct(table, args.world, args.seed, DEFAULT_WINDOW_ROWS, os.path.join(case, "shards"))
        del table
    stage_s = time.perf_counter() - t0
    command = [sys.executable, os.path.abspath(__file__), "--measure", json.dumps(paths[0]),
               "--cache", os.path.join(case, "cache"), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--seed", str(args.seed)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update({"table_rows": rows, "staged_by": "spark" if spark else "direct", "write_table_s": write_s,
                   "stage_s": stage_s})
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 2_000_000])
    parser.add_argument("--quick", action="store_true", help="5k and 50k rows, 20 steps, shards written directly")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spark-max-rows", type=int, default=100_000,
                        help="stage with Spark up to this many rows, directly (numpy) above")
    parser.add_argument("--direct", action="store_true", help="write every case's shards directly (no Spark)")
    parser.add_argument("--work", default="", help="scratch folder (default: a temp folder, removed)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_rank(json.loads(args.measure), args.cache, args.batch_size, args.steps, args.seed)))
        return 0
    if args.quick:
        args.rows, args.steps, args.direct = [5_000, 50_000], 20, True
    work = args.work or tempfile.mkdtemp(prefix="sparktune-rank-memory-")
    try:
        results = [run_case(n, args, work) for n in args.rows]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'table rows':>11} {'shard rows':>10} {'staged by':>9} {'baseline MB':>11} {'after read MB':>13} "
          f"{'peak MB':>8} {'read s':>7} {'batches/s':>9}")
    for r in results:
        print(f"{r['table_rows']:>11} {r['rows']:>10} {r['staged_by']:>9} {r['baseline_mb']:>11.1f} "
              f"{r['after_read_mb']:>13.1f} {r['peak_mb']:>8.1f} {r['read_s']:>7.2f} {r['batches_per_s']:>9.1f}")
    growth = results[-1]["peak_mb"] / results[0]["peak_mb"] - 1
    print(f"peak RSS growth {results[0]['table_rows']} -> {results[-1]['table_rows']} rows: {growth:+.1%} "
          f"(target <= +10%)")
    print(json.dumps({"results": results, "growth": growth}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
