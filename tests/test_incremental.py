"""Issue 21: ``source_changes`` without a change data feed. When every commit since the base
version only added files, the changed rows are the rows of those files (found from the Delta
log, no scan of the old version); any other commit in the range falls back to the full row
diff. Each case checks the rows found against what the statements changed, so a wrong way
(or a wrong fallback) fails."""

import pytest

from sparktune.incremental import ChangeSource, _appended_rows, source_changes
from sparktune.tables import parse_table_ref, table_version

COLUMNS = ["row_id", "text"]


def _make(spark, path, partitioned=False, column_mapping=False):
    props = []
    if column_mapping:
        props.append("'delta.columnMapping.mode' = 'name', 'delta.minReaderVersion' = '2', "
                     "'delta.minWriterVersion' = '5'")
    props_sql = f" TBLPROPERTIES ({', '.join(props)})" if props else ""
    partition = " PARTITIONED BY (part)" if partitioned else ""
    spark.sql(f"CREATE TABLE delta.`{path}` (row_id STRING, text STRING, part INT) USING DELTA{partition}{props_sql}")
    spark.sql(f"INSERT INTO delta.`{path}` SELECT concat('r', cast(id AS string)), concat('old text ', "
              "cast(id AS string)), cast(id % 2 AS int) FROM range(40)")
    return table_version(spark, path)


def _insert(spark, path, ids, text="new text"):
    values = ", ".join(f"('{i}', '{text} {i}', 1)" for i in ids)
    spark.sql(f"INSERT INTO delta.`{path}` VALUES {values}")


def _changes(spark, path, base):
    changes = source_changes(spark, path, base, table_version(spark, path), COLUMNS)
    keys = sorted(r["row_id"] for r in changes.keys.collect())
    inserted = None if changes.inserted is None else sorted(tuple(r) for r in changes.inserted.collect())
    return changes.via, keys, inserted


@pytest.fixture(params=["delta-log", "spark"])
def table(request, spark, tmp_path, monkeypatch):
    """The source table, its history and files read from the Delta log (a local table on a local
    master) or by Spark (what Connect, clusters and catalog tables use)."""
    from sparktune import tables

    # A space and '=' in the folder (and '%', which delta-rs cannot open: Spark only): file paths as
    # the log, the readers and Hadoop write them.
    if request.param == "spark":
        monkeypatch.setattr(tables, "_log_is_local", lambda *_: False)
        path = str(tmp_path / "source dir %41 a=b")
        return path, _make(spark, path)
    path = str(tmp_path / "source dir a=b")
    base = _make(spark, path)
    assert tables._commits_from_log(parse_table_ref(path), 0, base)  # the log is readable: no silent fallback
    return path, base


def test_appends_insert_only_merge_and_property_changes_read_only_the_added_files(spark, table):
    path, base = table
    _insert(spark, path, ["n1", "n2"])
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('sparktune.note' = 'x')")
    spark.sql(f"""MERGE INTO delta.`{path}` AS t USING (SELECT * FROM VALUES ('n3', 'merged n3', 1), ('r1', 'no', 1)
                  AS s(row_id, text, part)) AS s ON t.row_id = s.row_id WHEN NOT MATCHED THEN INSERT *""")
    _insert(spark, path, ["r2"], text="a second row for an existing row_id")
    via, keys, inserted = _changes(spark, path, base)
    assert via is ChangeSource.APPENDED_FILES
    assert keys == ["n1", "n2", "n3", "r2"]
    assert inserted == [("n1", "new text n1"), ("n2", "new text n2"), ("n3", "merged n3"),
                        ("r2", "a second row for an existing row_id r2")]
    # Nothing since: no rows.
    assert _changes(spark, path, table_version(spark, path)) == (ChangeSource.APPENDED_FILES, [], [])


def test_an_append_then_a_delete_or_update_falls_back_to_the_row_diff(spark, table):
    path, base = table
    _insert(spark, path, ["n1"])
    spark.sql(f"DELETE FROM delta.`{path}` WHERE row_id = 'r3'")
    assert _changes(spark, path, base) == (ChangeSource.ROW_DIFF, ["n1", "r3"], None)
    middle = table_version(spark, path)
    _insert(spark, path, ["n2"])
    spark.sql(f"UPDATE delta.`{path}` SET text = 'changed' WHERE row_id = 'r4'")
    assert _changes(spark, path, middle) == (ChangeSource.ROW_DIFF, ["n2", "r4"], None)


def test_compaction_and_overwrites_fall_back_to_the_row_diff(spark, table):
    path, base = table
    _insert(spark, path, ["n1"])
    spark.sql(f"OPTIMIZE delta.`{path}`")  # rewrites every file: the added files are not the new rows
    assert _changes(spark, path, base) == (ChangeSource.ROW_DIFF, ["n1"], None)
    before = table_version(spark, path)
    spark.sql(f"INSERT OVERWRITE delta.`{path}` SELECT * FROM delta.`{path}` WHERE row_id != 'r5'")
    assert _changes(spark, path, before) == (ChangeSource.ROW_DIFF, ["r5"], None)


def test_vacuum_after_appends_keeps_the_fast_way(spark, table):
    path, base = table
    _insert(spark, path, ["n1"])
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    spark.conf.set("spark.databricks.delta.vacuum.logging.enabled", "true")
    try:
        spark.sql(f"VACUUM delta.`{path}` RETAIN 0 HOURS")
    finally:
        spark.conf.unset("spark.databricks.delta.retentionDurationCheck.enabled")
        spark.conf.unset("spark.databricks.delta.vacuum.logging.enabled")
    assert table_version(spark, path) > base + 1  # VACUUM START/END are commits of the range
    assert _changes(spark, path, base) == (ChangeSource.APPENDED_FILES, ["n1"], [("n1", "new text n1")])


@pytest.mark.parametrize("layout", ["partitioned", "column-mapping"])
def test_tables_whose_files_do_not_hold_the_rows_as_shown_use_the_row_diff(spark, tmp_path, layout):
    path = str(tmp_path / layout)
    base = _make(spark, path, partitioned=layout == "partitioned", column_mapping=layout == "column-mapping")
    _insert(spark, path, ["n1", "n2"])
    # Refused by the layout check itself (not by an error the fallback would hide).
    assert _appended_rows(spark, parse_table_ref(path), base, table_version(spark, path), COLUMNS) is None
    assert _changes(spark, path, base) == (ChangeSource.ROW_DIFF, ["n1", "n2"], None)


def test_the_change_data_feed_comes_first(spark, table):
    path, _ = table
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('delta.enableChangeDataFeed' = 'true')")
    base = table_version(spark, path)
    _insert(spark, path, ["n1"])
    assert _changes(spark, path, base) == (ChangeSource.CHANGE_DATA_FEED, ["n1"], [("n1", "new text n1")])
