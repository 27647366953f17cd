"""Issue 19: with ``--json`` every subcommand prints exactly one JSON object on stdout: its result,
or on failure ``{"error", "kind", "command", "exit_code"}``; everything else goes to stderr.

The stages run for real, in this process through ``sparktune.cli.main`` on tiny Delta tables with
a real (untrained) MiniLM classifier logged to a real MLflow store; ``capfd`` reads file descriptor
1, so what Spark or a child process writes there would be caught too. ``serve`` and the error paths
run as programs. The ``openai`` steps' successes are tests/test_openai_contract.py's (against the
fake Azure server); their failures are here.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest
from evalkit import build_classifier

from sparktune.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_object(out: str) -> dict:
    lines = out.strip().splitlines()
    assert len(lines) == 1, out[-3000:]
    value = json.loads(lines[0])
    assert isinstance(value, dict)
    return value


def _run(capfd, argv, code=0) -> dict:
    capfd.readouterr()
    rc = main([*argv, "--json"])
    captured = capfd.readouterr()
    assert rc == code, captured.err[-3000:]
    return _one_object(captured.out)


@pytest.fixture(scope="module")
def logged(tmp_path_factory, minilm_path):
    """A classifier logged as the one sparktune artifact, in its own run of a real SQLite store."""
    from sparktune.model import artifact
    from sparktune.tracking import Tracker

    base = tmp_path_factory.mktemp("cli_json")
    uri = f"sqlite:///{base}/mlflow.db"
    tracker = Tracker(uri, "cli-json")
    run_id = tracker.start_run("train")
    model_uri = artifact.log_model(build_classifier(minilm_path, str(base / "hf")), "classification",
                                   tracker=tracker, run_id=run_id, max_length=64)
    tracker.end_run(run_id)
    return base, uri, run_id, model_uri


def test_every_stage_prints_one_json_object(spark, logged, imdb_sample_path, gpt2_tokenizer_path, capfd):
    base, store, run_id, model_uri = logged
    raw, tokens = str(base / "raw"), str(base / "tokens")
    track = ["--tracking-uri", store]

    assert _run(capfd, ["ingest", "--source", imdb_sample_path, "--output", raw])["raw_rows"] == 340
    tok = _run(capfd, ["tokenize", "--input", raw, "--output", tokens, "--tokenizer", gpt2_tokenizer_path,
                       "--max-length", "32"])
    assert tok["output"] == tokens and not tok["skipped"]
    assert _run(capfd, ["stats", "--table", tokens])
    rows = _run(capfd, ["sql", f"SELECT split, count(*) AS n FROM delta.`{tokens}` GROUP BY split ORDER BY split"])
    assert {"train", "test"} <= {r["split"] for r in rows["rows"]}

    evaluated = _run(capfd, ["evaluate", "--model", model_uri, "--table", raw, "--split", "test", "--limit", "8",
                             "--run-id", run_id, *track])
    assert evaluated["rows"] == 8 and evaluated["run_id"] == run_id, evaluated
    new = str(base / "new_reviews")
    texts = pd.read_parquet(os.path.join(imdb_sample_path, "test.parquet"))["text"].head(6).tolist()
    from sparktune.tables import write_table

    write_table(spark.createDataFrame([(t,) for t in texts], "text string"), new)
    predicted = _run(capfd, ["predict", "--model", model_uri, "--table", new, "--output", str(base / "pred"),
                             *track])
    assert predicted["rows"] == 6, predicted
    registered = _run(capfd, ["register", "--run-id", run_id, "--name", "cli-json-model", *track])
    assert registered["version"] == "1" and registered["promoted"], registered
    exported = _run(capfd, ["export-model", "--model", model_uri, "--output", str(base / "export"), *track])
    assert os.path.isfile(os.path.join(exported["output"], "MLmodel"))

    # Failures: one object too, naming the command; the message is also on stderr.
    failed = _run(capfd, ["evaluate", "--model", model_uri, "--table", str(base / "nowhere"), *track], code=2)
    assert failed["kind"] == "user" and failed["command"] == "evaluate" and failed["exit_code"] == 2
    failed = _run(capfd, ["sql", "--limit", "0", "SELECT 1"], code=2)
    assert failed["error"].endswith("--limit: must be at least 1, found 0")


def _program(*argv, env=None, timeout=180):
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_OPENAI", "OPENAI_"))}
    return subprocess.run([sys.executable, "-m", "sparktune.cli", *argv, "--json"], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**base_env, "PYTHONPATH": ROOT, **(env or {})})


@pytest.mark.parametrize("argv, says", [
    (["train", "--config", "/nonexistent/train.yaml"], "config file /nonexistent/train.yaml does not exist"),
    (["pipeline", "--config", "/nonexistent/pipeline.yaml"], "/nonexistent/pipeline.yaml does not exist"),
    (["serve", "--model", "./nowhere", "--port", "70000"], "--port must be 1..65535"),
    (["tokenize", "--input", "a", "--output", "b", "--tokenizer", "c", "--max-length", "1"],
     "--max-length: must be at least 2"),
    (["openai", "validate"], "give --data DIR"),
    (["openai", "submit", "--data", "./nowhere"], "no API credentials"),
    (["openai", "follow"], "no API credentials"),
    (["openai", "deploy", "--name", "x"], "no API credentials"),
    (["openai", "score", "--table", "./nowhere", "--deployment", "x"], "no API credentials"),
    (["register", "--run-id", "x", "--name", "y", "--tracking-uri", "sqlite:///{tmp}/mlflow.db"], "no such run"),
], ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else None)
def test_failures_print_one_json_object_as_a_program(argv, says, tmp_path):
    proc = _program(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert proc.returncode == 2, proc.stderr[-3000:]
    answer = _one_object(proc.stdout)
    assert says in answer["error"] and answer["kind"] == "user", answer
    assert says in proc.stderr and "Traceback" not in proc.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(300)
def test_serve_prints_one_json_object_when_stopped(logged):
    _, store, _, model_uri = logged
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sparktune.cli", "serve", "--model", model_uri, "--port", str(port),
                             "--tracking-uri", store, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert _one_object(out) == {"model_uri": model_uri, "url": f"http://127.0.0.1:{port}"}
    assert f"serving {model_uri}" in err  # what serve says while it runs went to stderr
