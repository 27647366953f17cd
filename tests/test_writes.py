"""Issue 8, writes: real processes writing the same tables at once, and a real SIGKILL mid-write.

Each child is `python -m sparktune.cli ingest` with its own SPARKTUNE_HOME (a Derby metastore
admits one process) on local[1].
"""

import json
import os
import signal
import subprocess
import sys
import time

from deltalake import DeltaTable

from sparktune.ingest import ingest
from sparktune.tables import table_properties

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Starts Spark first, then waits for the go file, so both writers reach the write together.
_RACER = """
import os, sys, time
from sparktune.spark import get_spark
from sparktune.cli import main
get_spark(master="local[1]")
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
sys.exit(main(sys.argv[2:]))
"""


def _env(home):
    env = dict(os.environ, SPARKTUNE_HOME=str(home), PYTHONPATH=ROOT, SPARKTUNE_SHUFFLE_PARTITIONS="2")
    env.pop("PYSPARK_SUBMIT_ARGS", None)
    return env


def _corpus(path, tag, rows, bad_every=4, text_size=40):
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(rows):
            label = 5 if i % bad_every == 0 else i % 2
            handle.write(json.dumps({"text": f"{tag} {i} " + "x" * text_size, "label": label}) + "\n")
    return str(path)


def _tags(frame, column):
    return {
        value.split(" ")[0] if column == "text" else json.loads(value)["text"].split(" ")[0] for value in frame[column]
    }


def test_two_processes_writing_the_same_tables_never_mix(spark, tmp_path):
    out = str(tmp_path / "raw")
    sources = {tag: _corpus(tmp_path / f"{tag}.jsonl", tag, 400) for tag in ("A", "B")}
    ingest(spark, _corpus(tmp_path / "seed.jsonl", "S", 40), out)  # version 0 exists: both replace it
    go = tmp_path / "go"
    # Output to files, not pipes: a child blocked on a full pipe would never finish.
    logs = {tag: (open(tmp_path / f"{tag}.out", "w+"), open(tmp_path / f"{tag}.err", "w+")) for tag in sources}  # noqa: SIM115
    procs = {
        tag: subprocess.Popen(
            [sys.executable, "-c", _RACER, str(go), "ingest", "--source", src, "--output", out, "--master", "local[1]"],
            env=_env(tmp_path / f"home_{tag}"), stdout=logs[tag][0], stderr=logs[tag][1],
        )
        for tag, src in sources.items()
    }
    time.sleep(25)  # both JVMs up (they wait for the go file)
    go.write_text("go")
    results = {}
    for tag, proc in procs.items():
        rc = proc.wait(timeout=1200)
        results[tag] = (rc, *((tmp_path / f"{tag}.{kind}").read_text() for kind in ("out", "err")))
        for handle in logs[tag]:
            handle.close()
    for tag, (rc, _stdout, stderr) in results.items():
        assert rc in (0, 2), (tag, stderr[-3000:])
        if rc == 2:  # refused, with a message, not a traceback
            assert "another writer committed" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert any(rc == 0 for rc, _, _ in results.values())
    # Every version of both tables holds exactly one run's rows, complete.
    for table, column, per_run in ((out, "text", 300), (out + "_quarantine", "record", 100)):
        history = DeltaTable(table).history()
        for entry in history:
            frame = DeltaTable(table, version=entry["version"]).to_pandas()
            tags = _tags(frame, column)
            assert len(tags) == 1, (table, entry["version"], tags)
            if tags != {"S"}:
                assert len(frame) == per_run, (table, entry["version"], len(frame))
    # The raw table names the quarantine version written by the same run.
    props = table_properties(spark, out)
    quarantine_at = DeltaTable(out + "_quarantine", version=int(props["sparktune.quarantine_version"]))
    assert _tags(quarantine_at.to_pandas(), "record") == _tags(DeltaTable(out).to_pandas(), "text")


def test_sigkill_mid_write_leaves_the_previous_version_and_a_rerun_completes(spark, tmp_path):
    out = str(tmp_path / "raw")
    quarantine = out + "_quarantine"
    before = ingest(spark, _corpus(tmp_path / "seed.jsonl", "S", 40), out)
    big = _corpus(tmp_path / "big.jsonl", "B", 10_000, bad_every=2, text_size=1500)
    known = {t: set(_data_files(t)) for t in (out, quarantine)}
    child = subprocess.Popen(
        [sys.executable, "-m", "sparktune.cli", "ingest", "--source", big, "--output", out, "--master", "local[1]"],
        env=_env(tmp_path / "home_child"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 600
    killed_in = None
    while time.time() < deadline and child.poll() is None and killed_in is None:
        for table in (out, quarantine):
            if set(_data_files(table)) - known[table]:  # the job is writing data files: kill it now
                os.killpg(child.pid, signal.SIGKILL)
                killed_in = table
                break
        time.sleep(0.02)
    child.wait(timeout=60)
    assert killed_in is not None and child.returncode == -signal.SIGKILL, "the child finished before it could be killed"
    # Both tables are readable; each is at its previous version or (quarantine only) the new run's complete one.
    raw_now = DeltaTable(out)
    assert raw_now.version() == before.output_version
    assert _tags(raw_now.to_pandas(), "text") == {"S"} and len(raw_now.to_pandas()) == before.raw_rows
    assert table_properties(spark, out)["sparktune.quarantine_version"] == str(before.quarantine_version)
    q_now = DeltaTable(quarantine)
    q_frame = q_now.to_pandas()
    if q_now.version() == before.quarantine_version:
        assert _tags(q_frame, "record") == {"S"}
    else:  # the quarantine committed before the kill: complete, and no raw version names it
        assert q_now.version() == before.quarantine_version + 1 and len(q_frame) == 5_000
    rerun = ingest(spark, big, out)
    assert (rerun.raw_rows, rerun.quarantined_rows) == (5_000, 5_000)
    assert len(DeltaTable(out).to_pandas()) == 5_000 and _tags(DeltaTable(out).to_pandas(), "text") == {"B"}


def _data_files(table):
    if not os.path.isdir(table):
        return []
    return [f for f in os.listdir(table) if f.endswith((".parquet", ".parquet.crc"))]
