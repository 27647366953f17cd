"""Serve: the model exactly as a real `sparktune train` run logged it and `sparktune register`
registered it, behind the real `sparktune serve` process on a free loopback port, over real
HTTP; `mlflow models serve` on the exported folder answers the same."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import requests
from evalkit import train_tiny_classifier

from sparktune.tracking import process_uris

MAX_BODY_MB = 1
MAX_ROWS = 200
REQUEST_TIMEOUT = 2
BODY_TIMEOUT = 2
HEADER_TIMEOUT = 2
KEEP_ALIVE = 2
MAX_CONNECTIONS = 64
BATCH_WAIT_S = 3.0
BATCH_ROWS = 4
TEXTS = ["What a wonderful, moving film.", "Dull, predictable and far too long."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory, minilm_path):
    return train_tiny_classifier(spark, tmp_path_factory.mktemp("serve_train"), minilm_path)


def _start(cmd, log_path, env, url, what):
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    started = time.monotonic()
    while time.monotonic() - started < 240:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(url + "/ping", timeout=2).status_code == 200:
                return proc, time.monotonic() - started
        except requests.ConnectionError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"{what} did not answer /ping in 240 s:\n{log_path.read_text()[-3000:]}")


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("serve_log") / "server.log"
    env = dict(os.environ, SPARKTUNE_TORCH_THREADS="1")
    cmd = [sys.executable, "-m", "sparktune.cli", "serve", "--model", trained.registered_uri, "--tracking-uri",
           trained.tracking_uri, "--port", str(port), "--max-body-mb", str(MAX_BODY_MB), "--max-rows", str(MAX_ROWS),
           "--request-timeout", str(REQUEST_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
           "--header-timeout", str(HEADER_TIMEOUT), "--keep-alive", str(KEEP_ALIVE),
           "--max-connections", str(MAX_CONNECTIONS)]
    proc, _ = _start(cmd, log_path, env, url, "sparktune serve")
    yield url, proc.pid
    _stop(proc)


@pytest.fixture(scope="module")
def batch_server(trained, tmp_path_factory):
    """A server whose batch window is long enough to see from outside: a batch closes at
    BATCH_ROWS rows or BATCH_WAIT_S after its first request."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("serve_batch_log") / "server.log"
    env = dict(os.environ, SPARKTUNE_TORCH_THREADS="1")
    cmd = [sys.executable, "-m", "sparktune.cli", "serve", "--model", trained.registered_uri, "--tracking-uri",
           trained.tracking_uri, "--port", str(port), "--batch-max-rows", str(BATCH_ROWS),
           "--batch-wait-ms", str(BATCH_WAIT_S * 1000)]
    proc, _ = _start(cmd, log_path, env, url, "sparktune serve (batching)")
    yield url
    _stop(proc)


def _post(url, body, content_type="application/json", timeout=60):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(url + "/invocations", data=data, headers={"Content-Type": content_type}, timeout=timeout)


def _assert_serves(url, expected=None):
    r = _post(url, {"inputs": [TEXTS[0]]})
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    if expected is not None:
        assert pred == expected
    return pred


def test_serves_the_registered_artifact_with_every_probability(server, trained):
    import mlflow
    import numpy as np
    import pandas as pd

    url, _ = server
    assert requests.get(url + "/ping", timeout=5).status_code == 200
    assert requests.get(url + "/health", timeout=5).status_code == 200
    # The registered version is the logged model itself, not a copy converted on the way.
    from mlflow import MlflowClient

    client = MlflowClient(trained.tracking_uri)
    version = client.get_model_version_by_alias("imdb-clf", "champion")
    logged = client.get_logged_model(trained.model_uri.split("/")[-1])
    # Registered from the LoggedModel (models:/m-...), so the version is linked to it.
    assert version.source == f"models:/{logged.model_id}" and version.run_id == trained.run_id
    with process_uris(trained.tracking_uri, None):
        local = mlflow.pyfunc.load_model(trained.registered_uri).predict(pd.DataFrame({"text": TEXTS}))
    payloads = [
        {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}},
        {"dataframe_records": [{"text": t} for t in TEXTS]},
        {"inputs": TEXTS},
        {"inputs": {"text": TEXTS}},
    ]
    for payload in payloads:
        r = _post(url, payload)
        assert r.status_code == 200, (payload, r.text)
        preds = r.json()["predictions"]
        assert len(preds) == 2
        for pred, (_, row) in zip(preds, local.iterrows()):
            assert pred["label"] in ("negative", "positive")
            assert pred["label"] == row["label"] and pred["prediction"] == row["prediction"]
            assert len(pred["probabilities"]) == 2 and sum(pred["probabilities"]) == pytest.approx(1.0)
            np.testing.assert_allclose(pred["probabilities"], row["probabilities"], atol=1e-6)


PRIVATE = "my private review 8812731"


@pytest.mark.parametrize(
    "body, content_type, status, says",
    [
        (b"this is not json " + PRIVATE.encode(), "application/json", 400, "valid JSON"),
        (b'{"inputs": ["' + PRIVATE.encode() + b'"', "application/json", 400, "valid JSON"),
        ({"reviews": [PRIVATE]}, "application/json", 400, "exactly one of the input fields"),
        ({"dataframe_records": []}, "application/json", 400, "missing inputs ['text']"),
        ({"inputs": []}, "application/json", 400, "no rows to score"),
        ({"dataframe_records": [{"review": PRIVATE}]}, "application/json", 400, "missing inputs ['text']"),
        ({"inputs": [5, 6]}, "application/json", 400, "expected the text as a string, found int"),
        ({"dataframe_split": {"columns": ["text"], "data": [[1.5]]}}, "application/json", 400, "found float"),
        ({"dataframe_records": [{"text": None}]}, "application/json", 400, "found NoneType"),
        ([PRIVATE, 2], "application/json", 400, "Received a list"),
        (b"hello", "text/plain", 415, "only supports"),
        ({"inputs": ["good"] * (MAX_ROWS + 1)}, "application/json", 413, f"limit of {MAX_ROWS} rows"),
        (b'{"inputs": ["' + b"a" * (MAX_BODY_MB * 1024 * 1024 + 10) + b'"]}', "application/json", 413,
         "over this server's limit"),
    ],
    ids=["not-json", "truncated-json", "wrong-field", "empty-records", "empty-inputs", "wrong-column", "ints",
         "float", "null", "top-level-list", "wrong-content-type", "too-many-rows", "huge-body"],
)
def test_malformed_payloads_get_clean_4xx_and_server_survives(server, body, content_type, status, says):
    url, _ = server
    before = _assert_serves(url)
    r = _post(url, body, content_type)
    assert r.status_code == status, r.text[:500]
    assert says in r.text
    # No stack trace, and nothing of the request echoed back (MLflow's app does both).
    assert "Traceback" not in r.text and "stack_trace" not in r.text and 'File "' not in r.text
    assert PRIVATE not in r.text and "this is not json" not in r.text
    _assert_serves(url, expected=before)


def test_huge_chunked_body_is_refused(server):
    url, _ = server

    def chunks():
        yield b'{"inputs": ["'
        for _ in range(MAX_BODY_MB * 4):
            yield b"a" * (256 * 1024)
        yield b'"]}'

    r = requests.post(url + "/invocations", data=chunks(), headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413
    _assert_serves(url)


def test_stalled_upload_gets_408_and_cannot_hold_the_server(server):
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT + 10) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"inputs\": [\"slow")
        started = time.monotonic()
        answer = sock.recv(4096).decode(errors="replace")  # then the client sends nothing more
        waited = time.monotonic() - started
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert BODY_TIMEOUT - 0.5 < waited < BODY_TIMEOUT + 5
    assert "slow" not in answer.split("\r\n\r\n", 1)[1]
    _assert_serves(url)


def _server_processes(pid: int) -> list:
    """The server's process and its model worker processes (``--batch-worker-kind process``)."""
    import psutil

    server = psutil.Process(pid)
    return [server, *server.children(recursive=True)]


def _cpu_seconds(pid: int) -> float:
    """CPU seconds of the server and its worker processes: the work may run in either."""
    import psutil

    total = 0.0
    for process in _server_processes(pid):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def test_by_default_batches_are_scored_in_two_worker_processes(server):
    """On this CPU the default batch workers are processes of their own (``--batch-worker-kind auto``):
    two of them, and a request's forward pass spends CPU in them, not in the server's process."""
    import psutil

    url, pid = server
    workers = [p for p in psutil.Process(pid).children() if "spawn_main" in " ".join(p.cmdline())
               and "resource_tracker" not in " ".join(p.cmdline())]
    assert len(workers) == 2, [p.cmdline() for p in psutil.Process(pid).children()]

    def worker_cpu():
        return sum(t.user + t.system for t in (p.cpu_times() for p in workers))

    before = worker_cpu()
    r = _post(url, {"inputs": [" ".join(TEXTS * 40)] * 8})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 8
    assert worker_cpu() - before > 0.05, "the batch was not scored in a worker process"


def test_request_past_its_time_limit_gets_504_and_its_work_stops(server):
    url, pid = server
    long_text = " ".join(["The film was a long, slow meditation on memory and loss, beautifully shot."] * 10)
    started = time.monotonic()
    r = _post(url, {"inputs": [long_text] * MAX_ROWS}, timeout=120)  # ~minutes of work on one thread
    assert r.status_code == 504, r.text[:300]
    assert "stopped" in r.json()["message"]
    assert time.monotonic() - started < REQUEST_TIMEOUT + 5
    time.sleep(1.5)  # the layer running at the deadline finishes
    cpu_before = _cpu_seconds(pid)
    time.sleep(2.0)
    busy = _cpu_seconds(pid) - cpu_before
    assert busy < 0.5, f"the server kept computing the abandoned request: {busy:.2f} CPU s in 2 s"
    _assert_serves(url)


def test_mlflow_models_serve_on_the_export_answers_the_same(server, trained, tmp_path):
    """The exported folder is the registered artifact; MLflow's own server, in an environment
    where sparktune cannot be imported, gives the same answers as `sparktune serve`."""
    import yaml

    from sparktune.errors import SparktuneError
    from sparktune.serve import export_model
    from sparktune.tracking import Tracker

    url, _ = server
    out = str(tmp_path / "export")
    export_model(trained.registered_uri, out, Tracker(trained.tracking_uri))
    with open(os.path.join(out, "MLmodel")) as handle:
        mlmodel = yaml.safe_load(handle)
    assert mlmodel["model_id"] == trained.model_uri.split("/")[-1]
    assert mlmodel["metadata"]["task"] == "classification"
    assert mlmodel["metadata"]["labels"] == ["negative", "positive"]
    assert "probabilities" in mlmodel["signature"]["outputs"]
    with open(os.path.join(out, "requirements.txt")) as handle:
        reqs = handle.read()
    assert "mlflow==" in reqs and "torch==" in reqs and "transformers==" in reqs and "+cu" not in reqs
    assert os.path.exists(os.path.join(out, "code", "sparktune_hf.py"))
    with pytest.raises(SparktuneError, match="not empty"):
        export_model(out, out)

    blocker = tmp_path / "no_sparktune" / "sparktune"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('sparktune must not be needed to serve the model')\n")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(blocker.parent), SPARKTUNE_TORCH_THREADS="1")
    proc, startup = _start([sys.executable, "-m", "mlflow", "models", "serve", "-m", out, "--env-manager", "local",
                            "--host", "127.0.0.1", "-p", str(port)], tmp_path / "mlflow_serve.log", env,
                           f"http://127.0.0.1:{port}", "mlflow models serve")
    try:
        theirs = _post(f"http://127.0.0.1:{port}", {"inputs": TEXTS})
        ours = _post(url, {"inputs": TEXTS})
        assert theirs.status_code == ours.status_code == 200, theirs.text[:300]
        # Same labels; probabilities to float32 rounding (torch 2.7's CPU kernels differ in the last bits
        # between the two processes).
        theirs_preds, ours_preds = theirs.json()["predictions"], ours.json()["predictions"]
        assert [p["label"] for p in theirs_preds] == [p["label"] for p in ours_preds]
        for a, b in zip(theirs_preds, ours_preds):
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)
    finally:
        _stop(proc)
    print(f"mlflow models serve answered /ping after {startup:.1f} s")


DEEP = 100_000


@pytest.mark.parametrize(
    "body, status, says",
    [
        ('{"inputs": ' + "[" * DEEP + "]" * DEEP + "}", 400, "deeper than this server accepts"),
        ('{"dataframe_split": {"columns": ["text"], "data": ' + "[" * DEEP + "]" * DEEP + "}}", 400,
         "deeper than this server accepts"),
        ('{"inputs": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}", 400, "deeper than this server accepts"),
        ('{"inputs": ' + "[" * 900 + '"a film"' + "]" * 900 + "}", 400, "deeper than this server accepts"),
        ('{"inputs": [' + "9" * 5000 + "]}", 400, "integer longer than"),
        ('{"dataframe_split": {"columns": ["text"], "data": [[' + "7" * 5000 + "]]}}", 400, "integer longer than"),
        (json.dumps({"inputs": ["a film " * 30_000]}), 413, "characters per text"),
    ],
    ids=["deep-inputs", "deep-split-data", "deep-objects", "depth-900", "5000-digit-int", "5000-digit-in-split",
         "huge-text"],
)
def test_hostile_json_gets_4xx_not_500(server, body, status, says):
    url, _ = server
    before = _assert_serves(url)
    r = _post(url, body)
    assert r.status_code == status, r.text[:500]
    assert says in r.json()["message"]
    assert "Traceback" not in r.text and "a film a film" not in r.text
    _assert_serves(url, expected=before)


def _closed_within(sock: socket.socket, deadline: float) -> tuple[bool, bytes]:
    """Whether the server closed ``sock`` before ``deadline`` (monotonic), and what it sent."""
    got = b""
    try:
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(4096)
            if not chunk:
                return True, got
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        return True, got
    except TimeoutError:
        return False, got


def test_stalled_request_heads_are_dropped_and_connections_are_capped(server):
    """300 connections that send half a request head and stall: past MAX_CONNECTIONS they are
    refused at once, the rest answered 408 and closed after HEADER_TIMEOUT (uvicorn alone holds
    all 300 for ever); then the server serves."""
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    socks = []
    try:
        started = time.monotonic()
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
            socks.append(sock)
        results = [_closed_within(sock, started + HEADER_TIMEOUT + 5) for sock in socks]
        waited = time.monotonic() - started
    finally:
        for sock in socks:
            sock.close()
    held = sum(not closed for closed, _ in results)
    assert held == 0, f"{held} of 300 stalled connections still held after {waited:.1f} s"
    timed_out = [got for _, got in results if got.startswith(b"HTTP/1.1 408")]
    assert 0 < len(timed_out) <= MAX_CONNECTIONS
    _assert_serves(url)


def _read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response (head and Content-Length body) from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_idle_connections_time_out(server):
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    # A connection that never sends a byte: the head deadline runs from the connection's start.
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.monotonic()
        closed, got = _closed_within(sock, started + HEADER_TIMEOUT + 5)
        assert closed and got.startswith(b"HTTP/1.1 408"), got[:100]
        assert HEADER_TIMEOUT - 0.5 < time.monotonic() - started < HEADER_TIMEOUT + 3
    # A kept-alive connection, idle after its answer: uvicorn's timeout_keep_alive closes it.
    body = json.dumps({"inputs": [TEXTS[0]]}).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        sock.settimeout(30)
        answer = _read_response(sock)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        started = time.monotonic()
        closed, _ = _closed_within(sock, started + KEEP_ALIVE + 5)
        assert closed and time.monotonic() - started < KEEP_ALIVE + 3
    # A second head on a kept-alive connection that stalls half way is dropped too.
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        sock.settimeout(30)
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: 1")
        started = time.monotonic()
        closed, got = _closed_within(sock, started + HEADER_TIMEOUT + 5)
        assert closed and got.startswith(b"HTTP/1.1 408"), got[:100]


def _rss_mb(pid: int) -> float:
    """Resident memory of the server and its worker processes together."""
    import psutil

    total = 0
    for process in _server_processes(pid):
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 1024 / 1024


def test_memory_returns_after_a_burst_of_hostile_requests(server):
    from concurrent.futures import ThreadPoolExecutor

    url, pid = server
    for _ in range(3):
        _assert_serves(url)
    before = _rss_mb(pid)
    bodies = (['{"inputs": ' + "[" * DEEP + "]" * DEEP + "}"] * 10
              + ['{"inputs": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}"] * 10
              + ['{"inputs": [' + "9" * 5000 + "]}"] * 10
              + [json.dumps({"inputs": ["x" * (MAX_BODY_MB * 1024 * 1024 - 100)]})] * 8
              + ['{"inputs": [' + ", ".join(['"a film"'] * MAX_ROWS) + "]}"] * 4)

    def post(body):
        try:
            return _post(url, body, timeout=120).status_code
        except requests.RequestException as exc:
            return type(exc).__name__

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(post, bodies))
    assert all(code in (200, 400, 413) for code in codes), codes
    time.sleep(2)
    grown = _rss_mb(pid) - before
    assert grown < 60, f"the server grew by {grown:.0f} MB after the burst"
    _assert_serves(url)


def test_concurrent_requests_are_batched_and_answered_each_with_its_own_rows(batch_server, trained):
    """BATCH_ROWS single-row requests sent together are scored in one batch (the server says so
    in x-sparktune-batch-rows) well before the batch window ends, and each answer is its own
    text's (texts with distinct probabilities, so a mix-up shows)."""
    from concurrent.futures import ThreadPoolExecutor

    import mlflow
    import numpy as np
    import pandas as pd

    texts = ["What a wonderful, moving film.", "Dull, predictable and far too long.",
             "An average story, saved by the music.", "I walked out after twenty minutes; awful."]
    with process_uris(trained.tracking_uri, None):
        local = mlflow.pyfunc.load_model(trained.registered_uri).predict(pd.DataFrame({"text": texts}))
    expected = [np.asarray(p) for p in local["probabilities"]]
    assert all(not np.allclose(expected[i], expected[j], atol=1e-4) for i in range(4) for j in range(i))

    def ask(i):
        started = time.monotonic()
        r = _post(batch_server, {"inputs": [texts[i]]})
        return r, time.monotonic() - started

    with ThreadPoolExecutor(BATCH_ROWS) as pool:
        answers = list(pool.map(ask, range(BATCH_ROWS)))
    for i, (r, took) in enumerate(answers):
        assert r.status_code == 200, r.text[:300]
        assert r.headers["x-sparktune-batch-rows"] == str(BATCH_ROWS)
        assert took < BATCH_WAIT_S, f"a full batch waited for the window: {took:.2f} s"
        pred = r.json()["predictions"]
        assert len(pred) == 1
        np.testing.assert_allclose(pred[0]["probabilities"], expected[i], atol=1e-5)
        assert pred[0]["label"] == local["label"][i]


def test_a_lone_request_waits_no_longer_than_the_batch_window(batch_server):
    started = time.monotonic()
    r = _post(batch_server, {"dataframe_records": [{"text": TEXTS[0]}]})
    took = time.monotonic() - started
    assert r.status_code == 200 and r.headers["x-sparktune-batch-rows"] == "1"
    assert BATCH_WAIT_S - 0.2 < took < BATCH_WAIT_S + 3, took
