"""The one table snapshot (``sparktune.tables.read_snapshot``): the same answer through Spark SQL
and through the Delta log, at any version; failures raise, and resume's "table was recreated"
guard refuses a table whose identity differs or cannot be read."""

import os
import shutil

import pytest

from sparktune import tables
from sparktune.errors import ConfigError, SparktuneError
from sparktune.tables import (
    TableSnapshot,
    _commit,
    _commit_from_log,
    _commits_from_log,
    _file_layout_from_log,
    _log_is_local,
    _snapshot_through_spark,
    commit_metadata,
    commits,
    data_files,
    file_layout,
    last_commit,
    parse_table_ref,
    read_snapshot,
    write_table,
)


def _write(spark, path, rows, **props):
    df = spark.createDataFrame([(i, f"t{i}") for i in range(rows)], "id int, text string")
    return write_table(df, path, properties={f"sparktune.{k}": v for k, v in props.items()})


def _ours(props) -> dict:
    return {k: v for k, v in props.items() if k.startswith("sparktune.")}


def test_snapshot_is_the_same_through_spark_and_the_delta_log_at_every_version(spark, tmp_path):
    from deltalake import DeltaTable

    path = str(tmp_path / "t")
    assert _write(spark, path, 3, vocab="a", source="/data/tokens") == 0  # "token" in a value: not redacted
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('sparktune.task' = 'classification')")  # v1
    spark.sql(f"INSERT INTO delta.`{path}` VALUES (9, 'x')")  # v2: data only
    assert _write(spark, path, 2, vocab="b") == 3  # a replace: new properties
    spark.sql(f"ALTER TABLE delta.`{path}` UNSET TBLPROPERTIES ('sparktune.vocab')")  # v4
    spark.sql(f"INSERT INTO delta.`{path}` VALUES (10, 'y')")  # v5

    latest = read_snapshot(spark, path)  # a local path on a local master: read from the Delta log
    assert _log_is_local(spark, parse_table_ref(path))
    assert latest == _snapshot_through_spark(spark, parse_table_ref(path), None, "t")  # = Spark SQL's answer
    assert latest.version == 5 and latest.table_id == str(DeltaTable(path).metadata().id)
    assert latest.location == path and latest.uri == "file:" + path and latest.name is None
    expected = {0: {"sparktune.vocab": "a", "sparktune.source": "/data/tokens"},
                1: {"sparktune.vocab": "a", "sparktune.source": "/data/tokens", "sparktune.task": "classification"}}
    expected[2] = expected[1]
    for version in range(6):
        through_spark = read_snapshot(spark, path, version)
        from_log = read_snapshot(None, path, version)
        assert through_spark.version == from_log.version == version
        assert through_spark.table_id == from_log.table_id == latest.table_id
        assert (through_spark.location, through_spark.uri) == (from_log.location, from_log.uri)
        assert _ours(through_spark.properties) == _ours(from_log.properties), version
        if version in expected:
            assert _ours(through_spark.properties) == expected[version]
    assert _ours(read_snapshot(spark, path, 4).properties) == {}
    assert TableSnapshot.from_dict(latest.to_dict()) == latest


def test_latest_commit_is_the_same_from_the_delta_log_and_describe_history(spark, tmp_path):
    """``last_commit`` of a local path table reads the log with delta-rs; Spark SQL's DESCRIBE
    HISTORY (what Connect, clusters and catalog tables use) gives the same version, operation,
    userMetadata and metrics, after a write, an append with metadata and a DELETE."""
    path = str(tmp_path / "t")
    ref = parse_table_ref(path)
    _write(spark, path, 3, vocab="a")
    with commit_metadata(spark, {"stage": "test", "source_version": "7"}):
        spark.sql(f"INSERT INTO delta.`{path}` VALUES (9, 'x'), (10, 'y')")
    checked = []
    for step in ("append", "delete"):
        if step == "delete":
            spark.sql(f"DELETE FROM delta.`{path}` WHERE id = 9")
        assert _log_is_local(spark, ref)
        from_log, through_spark = _commit_from_log(ref), _commit(spark, ref, read_snapshot(spark, path).version)
        assert from_log == through_spark == last_commit(spark, path)
        metrics = from_log["operationMetrics"]
        checked.append((from_log["operation"], from_log["userMetadata"], metrics.get("numOutputRows")))
    assert checked[0][0] == "WRITE" and '"source_version": "7"' in checked[0][1] and checked[0][2] == "2"
    assert checked[1][0] == "DELETE" and checked[1][1] is None


def test_commits_and_file_layouts_are_the_same_from_the_delta_log_and_through_spark(spark, tmp_path, monkeypatch):
    """``commits`` and ``file_layout`` (the incremental builds' append-only check) read a local path
    table's log with delta-rs; Spark (DESCRIBE HISTORY, ``inputFiles()``, DESCRIBE DETAIL: what
    Connect, clusters and catalog tables use) gives the same commits and the same files, in one
    path form, at every version, in a folder whose name URIs and Hadoop treat specially."""
    path = str(tmp_path / "t dir a=b")
    ref = parse_table_ref(path)
    _write(spark, path, 3)  # v0
    spark.sql(f"INSERT INTO delta.`{path}` VALUES (9, 'x')")  # v1
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('sparktune.note' = 'n')")  # v2
    spark.sql(f"""MERGE INTO delta.`{path}` AS t USING (SELECT * FROM VALUES (10, 'm') AS s(id, text))
                  AS s ON t.id = s.id WHEN NOT MATCHED THEN INSERT *""")  # v3
    spark.sql(f"DELETE FROM delta.`{path}` WHERE id = 9")  # v4
    assert _log_is_local(spark, ref)
    from_log = _commits_from_log(ref, 1, 4)
    layouts_from_log = [_file_layout_from_log(ref, v) for v in range(5)]
    assert commits(spark, path, 1, 4) == from_log  # the log is what the public reader uses here
    monkeypatch.setattr(tables, "_log_is_local", lambda *_: False)  # now Spark's way, as on a cluster
    through_spark = commits(spark, path, 1, 4)
    assert [c.version for c in from_log] == [1, 2, 3, 4]
    assert [c.operation for c in from_log] == ["WRITE", "SET TBLPROPERTIES", "MERGE", "DELETE"]
    for log_commit, spark_commit in zip(from_log, through_spark, strict=True):
        assert log_commit == spark_commit
    assert from_log[0].parameters["mode"] == "Append" and from_log[2].metrics["numTargetFilesRemoved"] == "0"
    assert int(from_log[3].metrics["numDeletedRows"]) == 1
    for version, log_layout in enumerate(layouts_from_log):
        assert file_layout(spark, path, version).files == data_files(spark, path, version) == log_layout.files, version
        assert all(f.startswith(path + "/") and os.path.isfile(f) for f in log_layout.files)
    assert file_layout(spark, path, 4) == layouts_from_log[4]
    assert layouts_from_log[4].partition_columns == () and layouts_from_log[4].column_mapping == "none"
    assert len(layouts_from_log[1].files - layouts_from_log[0].files) == 1


def test_a_folder_delta_rs_cannot_open_is_read_through_spark(spark, tmp_path):
    """delta-rs decodes a "%41" in a folder's name (it opens "A"): the log readers raise and the
    public readers answer through Spark, with the same file paths."""
    path = str(tmp_path / "t %41")
    _write(spark, path, 3)
    spark.sql(f"INSERT INTO delta.`{path}` VALUES (9, 'x')")
    ref = parse_table_ref(path)
    with pytest.raises(Exception, match="t A"):
        _commits_from_log(ref, 0, 1)
    found = commits(spark, path, 0, 1)
    assert [c.version for c in found] == [0, 1] and found[1].operation == "WRITE"
    before, after = file_layout(spark, path, 0).files, file_layout(spark, path, 1).files
    assert before < after and len(after - before) == 1  # the INSERT's one file
    assert all(f.startswith(path + "/") and os.path.isfile(f) for f in after)


def test_snapshot_of_a_catalog_table_names_it(spark, tmp_path):
    name = "snapshot_named_t"
    spark.sql(f"DROP TABLE IF EXISTS {name}")
    try:
        _write(spark, name, 2, vocab="n")
        snap = read_snapshot(spark, name)
        assert snap.name is not None and snap.name.endswith(name) and snap.uri == snap.name
        assert snap.version == 0 and snap.properties["sparktune.vocab"] == "n"
        assert read_snapshot(None, snap.location).table_id == snap.table_id
        with pytest.raises(SparktuneError, match="catalog name, which only Spark can resolve"):
            read_snapshot(None, name, what="data.table")
    finally:
        spark.sql(f"DROP TABLE IF EXISTS {name}")


def test_missing_table_or_version_is_a_user_error_both_ways(spark, tmp_path):
    path = str(tmp_path / "t")
    for session in (spark, None):
        with pytest.raises(SparktuneError, match="data.table: no "):
            read_snapshot(session, path, what="data.table")
    _write(spark, path, 1)
    for session in (spark, None):
        with pytest.raises(SparktuneError, match="data.version: table .* has no version 7"):
            read_snapshot(session, path, 7, what="data.version")


def _resume_cfg(tmp_path, table):
    from sparktune.train.config import load_train_config

    return load_train_config(data={"output_dir": str(tmp_path / "out"), "resume": True,
                                   "model": {"name": "x", "task": "classification"},
                                   "data": {"table": table}, "mlflow": {"enabled": False}})


def test_resume_refuses_a_recreated_table_and_one_whose_identity_cannot_be_read(spark, tmp_path):
    from sparktune.tables import read_snapshot
    from sparktune.train.checkpoints import CheckpointStore, JobRecord, resume_problems
    from sparktune.train.pinned import pin_job

    path = str(tmp_path / "t")
    _write(spark, path, 3)
    cfg = _resume_cfg(tmp_path, path)
    first_id = read_snapshot(None, path).table_id
    store = CheckpointStore(cfg.checkpoint_dir)
    store.write_job(JobRecord(location=path, table=path, table_id=first_id, version=0, world_size=1))
    assert pin_job(cfg, 1).table.table_id == first_id  # same table: resume goes on

    shutil.rmtree(path)  # the table is deleted ...
    with pytest.raises(SparktuneError, match="no Delta table"):
        pin_job(cfg, 1)  # ... its identity cannot be read: an error, never "" (which passed the guard)
    _write(spark, path, 3)  # ... and written again: same path, same version, new id
    with pytest.raises(ConfigError, match="was recreated since the job"):
        pin_job(cfg, 1)
    # An unknown identity is a mismatch, not a pass.
    record = JobRecord(location=path, table=path, table_id=first_id, version=0, world_size=1)
    problems = resume_problems(record, location=path, table_id="", version=None, world_size=1,
                               written_world_size=None, where="ck")
    assert any("was recreated" in p for p in problems)
