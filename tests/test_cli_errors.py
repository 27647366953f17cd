"""Issue 18: failures a user causes end in exit 2 with a message, never a traceback or a Java stack.

Through the CLI (``sparktune.cli.main``) on real Delta tables; ``capfd`` captures file descriptor 2,
so what the JVM itself writes to the terminal is checked too.
"""

import contextlib
import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest
from deltalake import DeltaTable

from sparktune.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_stack(err: str) -> None:
    assert "Traceback" not in err, err[-3000:]
    assert "\tat org.apache" not in err and "\\tat org." not in err, err[-3000:]


def _fails(capfd, argv, *needles):
    code = main(argv)
    err = capfd.readouterr().err
    assert code == 2, err[-3000:]
    _no_stack(err)
    for needle in needles:
        assert needle in err, err[-3000:]
    return err


@pytest.fixture(scope="module")
def raw(spark, imdb_sample_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli_errors") / "raw")
    assert main(["ingest", "--source", imdb_sample_path, "--output", out]) == 0
    return out


@pytest.mark.parametrize("keep_crc", [True, False], ids=["checksum", "json"])
def test_truncated_delta_commit_is_a_message(spark, imdb_sample_path, gpt2_tokenizer_path, tmp_path, capfd,
                                             keep_crc):
    table = str(tmp_path / "raw")
    assert main(["ingest", "--source", imdb_sample_path, "--output", table]) == 0
    commit = os.path.join(table, "_delta_log", "00000000000000000000.json")
    data = open(commit, "rb").read()
    with open(commit, "wb") as handle:
        handle.write(data[: len(data) // 2])
    crc = os.path.join(table, "_delta_log", ".00000000000000000000.json.crc")
    if not keep_crc and os.path.exists(crc):
        os.remove(crc)  # no checksum (e.g. written by delta-rs): Spark's JSON parser meets the cut
    capfd.readouterr()
    _fails(capfd, ["tokenize", "--input", table, "--output", str(tmp_path / "tok"), "--tokenizer",
                   gpt2_tokenizer_path], "Delta table's log is damaged", "00000000000000000000.json")


def test_sql_runtime_errors_and_writes(spark, raw, capfd):
    capfd.readouterr()
    _fails(capfd, ["sql", f"SELECT 1 / (label - label) AS x FROM delta.`{raw}`"], "DIVIDE_BY_ZERO", "try_divide")
    _fails(capfd, ["sql", f"SELECT CAST(text AS INT) FROM delta.`{raw}`"], "try_cast")
    before = DeltaTable(raw).version(), len(DeltaTable(raw).to_pandas())
    for query in (f"DELETE FROM delta.`{raw}` WHERE true", f"-- just a comment\nUPDATE delta.`{raw}` SET label = 0",
                  f"WITH x AS (SELECT * FROM delta.`{raw}`) INSERT INTO delta.`{raw}` SELECT * FROM x",
                  f"DROP TABLE delta.`{raw}`", f"TRUNCATE TABLE delta.`{raw}`"):
        _fails(capfd, ["sql", query], "read-only", "--allow-writes")
    assert (DeltaTable(raw).version(), len(DeltaTable(raw).to_pandas())) == before
    assert main(["sql", f"SELECT count(*) AS n FROM delta.`{raw}` WHERE text LIKE '%delete%'"]) == 0
    assert main(["sql", "--allow-writes", f"DELETE FROM delta.`{raw}` WHERE label = 0"]) == 0
    assert DeltaTable(raw).version() == before[0] + 1


def test_paths_with_brackets_and_spaces_are_literal(spark, tmp_path, capfd):
    folder = tmp_path / "corpus [v1] {a,b} *"
    folder.mkdir()
    rows = [{"text": f"review {i}", "label": i % 2} for i in range(6)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_csv(folder / "test.csv", index=False)
    pd.DataFrame(rows).to_parquet(folder / "validation.parquet")
    acl = tmp_path / "acl [v1]" / "aclImdb"
    for split, label in (("train", "pos"), ("test", "neg")):
        (acl / split / label).mkdir(parents=True)
        (acl / split / label / "1_7.txt").write_text(f"an {split} review")
    # A decoy the glob "[v1]" would match ("corpus v ...") must not be read.
    decoy = tmp_path / "corpus v {a,b} *"
    decoy.mkdir()
    (decoy / "train.jsonl").write_text(json.dumps({"text": "decoy", "label": 0}) + "\n")
    for source, expected in ((folder, 18), (folder / "train.jsonl", 6), (acl, 2)):
        out = tmp_path / f"out [{expected}] x"
        assert main(["ingest", "--source", str(source), "--output", str(out)]) == 0, capfd.readouterr().err[-3000:]
        frame = DeltaTable(str(out)).to_pandas()
        assert len(frame) == expected and "decoy" not in set(frame["text"])
        assert main(["sql", f"SELECT count(*) AS n FROM delta.`{out}`"]) == 0


@contextlib.contextmanager
def _small_tmpfs(folder, options: str):
    """A 64 KiB tmpfs mounted at ``folder`` (root only: skipped otherwise), unmounted after."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options}size=64k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}size=64k) here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)  # lazy: the JVM may hold a file there


def test_full_disk_during_a_spark_write_is_a_message(spark, imdb_sample_path, tmp_path, capfd):
    with _small_tmpfs(tmp_path / "full", "") as mount:
        capfd.readouterr()
        _fails(capfd, ["ingest", "--source", imdb_sample_path, "--output", str(mount / "raw")],
               "disk is full", "nothing of this step was committed")


def test_read_only_folder_is_refused_before_any_work(spark, imdb_sample_path, tmp_path, capfd):
    with _small_tmpfs(tmp_path / "ro", "ro,") as mount:
        capfd.readouterr()
        _fails(capfd, ["ingest", "--source", imdb_sample_path, "--output", str(mount / "raw")], "may not write")


def test_unreachable_tracking_server_is_reported_fast_without_the_password(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, SPARKTUNE_HOME=str(tmp_path))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "sparktune.cli", "register", "--run-id", "0" * 32, "--name", "m",
                           "--tracking-uri", "http://USER:PASSWORD@127.0.0.1:1/"],
                          capture_output=True, text=True, timeout=120, env=env)
    took = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "unreachable" in proc.stderr and "127.0.0.1:1" in proc.stderr
    assert "PASSWORD" not in proc.stderr + proc.stdout and "no such run" not in proc.stderr
    _no_stack(proc.stderr)
    assert took < 30, took
