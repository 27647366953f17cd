"""Ingest from every source kind into real Delta tables on disk, with quarantine accounting."""

import json
import os

import pandas as pd
import pytest
from deltalake import DeltaTable

from sparktune.errors import SparktuneError
from sparktune.ingest import IngestSettings, detect_source, ingest, ingest_stage
from sparktune.tables import table_properties

LONG_TEXT = "A long review. " * (1_000_000 // 15)  # ~1 MB: kept, never truncated at ingest


def _delta_rows(path):
    return DeltaTable(str(path)).to_pandas()


def _check_accounting(result, spark, tmp_path=None):
    assert result.input_rows == result.raw_rows + result.quarantined_rows
    raw = spark.read.format("delta").load(result.output) if "/" in result.output else spark.table(result.output)
    quarantine = (
        spark.read.format("delta").load(result.quarantine)
        if "/" in result.quarantine
        else spark.table(result.quarantine)
    )
    assert raw.count() == result.raw_rows
    assert quarantine.count() == result.quarantined_rows


def test_split_folder_of_parquet_files(spark, imdb_sample_path, tmp_path):
    out = tmp_path / "raw"
    result = ingest(spark, imdb_sample_path, str(out))
    _check_accounting(result, spark)
    assert (result.input_rows, result.quarantined_rows) == (340, 0)
    rows = _delta_rows(out)
    assert rows.groupby("split").size().to_dict() == {"test": 100, "train": 200, "unsupervised": 40}
    assert set(rows.columns) >= {"row_id", "split", "text", "label", "id", "rating", "source_file"}
    assert rows["row_id"].is_unique
    assert rows["label"].dtype.kind == "i"
    assert set(rows.loc[rows.split == "unsupervised", "label"]) == {-1}
    source = pd.read_parquet(os.path.join(imdb_sample_path, "train.parquet"))
    merged = rows[rows.split == "train"].merge(source, on=["id", "label"], suffixes=("", "_src"))
    assert len(merged) == 200 and (merged["text"] == merged["text_src"]).all()  # byte-for-byte text


def test_rerun_is_a_new_version_without_duplicates(spark, imdb_sample_path, tmp_path):
    out = str(tmp_path / "raw")
    first = ingest(spark, imdb_sample_path, out)
    second = ingest(spark, imdb_sample_path, out)
    assert second.output_version == first.output_version + 1
    rows = _delta_rows(out)
    assert len(rows) == 340
    assert sorted(rows["row_id"]) == sorted(_delta_rows_at(out, first.output_version)["row_id"])


def test_the_raw_table_has_the_change_data_feed_unless_turned_off(spark, imdb_sample_path, tmp_path):
    """Issue 21: incremental tokenize/predict read the raw table's changes from Delta's change data
    feed; ingest turns it on for the raw table (not the quarantine, replaced by every run)."""
    out = str(tmp_path / "raw")
    first = ingest(spark, imdb_sample_path, out)
    assert table_properties(spark, out)["delta.enableChangeDataFeed"] == "true"
    assert "delta.enableChangeDataFeed" not in table_properties(spark, first.quarantine)
    spark.sql(f"DELETE FROM delta.`{out}` WHERE split = 'test'")
    feed = (spark.read.format("delta").option("readChangeFeed", "true")
            .option("startingVersion", first.output_version + 1).load(out))
    assert {r["_change_type"]: r["count"] for r in feed.groupBy("_change_type").count().collect()} == {"delete": 100}
    # Off, as the CLI (--no-change-data-feed) and a pipeline's ingest section pass it: a re-run writes false.
    ingest_stage(spark, IngestSettings(source=imdb_sample_path, output=out, change_data_feed=False))
    assert table_properties(spark, out)["delta.enableChangeDataFeed"] == "false"


def _delta_rows_at(path, version):
    return DeltaTable(path, version=version).to_pandas()


@pytest.fixture(scope="module")
def bad_rows_dir(tmp_path_factory):
    """CSV and JSONL files with every kind of bad row, plus good rows that must survive."""
    folder = tmp_path_factory.mktemp("bad_rows")
    csv_lines = [
        "text,label,rating",
        '"A fine film, truly.",1,9',
        '"Awful <br /><br />acting",0,2',  # HTML is kept
        '"Ünïcödé ✓ 映画 😀",pos,8',  # unicode and a label name
        '"",1,3',  # empty text: Spark's CSV reader reads "" as null, so "missing text"
        '"   ",0,3',  # whitespace only
        ",1,4",  # missing text
        '"no label here",,5',  # missing label
        '"bad label",seven,5',  # wrong type
        '"float label",1.5,5',  # wrong type
        '"out of range",3,5',  # out of range
        '"negative out of range",-2,5',
        '"too many fields",1,2,3,4',  # unparseable
        '"A fine film, truly.",1,9',  # exact duplicate
        f'"{LONG_TEXT}",1,10',
    ]
    (folder / "reviews.csv").write_text("\n".join(csv_lines) + "\n", encoding="utf-8")
    json_lines = [
        json.dumps({"text": "Loved it", "label": 1}),
        "this line is not JSON",
        json.dumps({"text": "Hated it", "label": "negative"}),
        json.dumps({"text": "true label", "label": True}),
        json.dumps({"text": "list label", "label": [1]}),
        json.dumps({"text": "no label"}),
        json.dumps({"text": None, "label": 0}),
        json.dumps({"text": "Loved it", "label": 1}),
    ]
    (folder / "reviews.jsonl").write_text("\n".join(json_lines) + "\n", encoding="utf-8")
    return folder


def test_csv_with_every_kind_of_bad_row(spark, bad_rows_dir, tmp_path):
    out = str(tmp_path / "raw")
    result = ingest(spark, str(bad_rows_dir / "reviews.csv"), out)
    _check_accounting(result, spark)
    assert result.input_rows == 14
    rows = _delta_rows(out)
    assert sorted(rows["label"]) == [0, 1, 1, 1]
    assert "Awful <br /><br />acting" in set(rows["text"])
    assert "Ünïcödé ✓ 映画 😀" in set(rows["text"])
    assert max(rows["text"].str.len()) == len(LONG_TEXT)
    assert set(rows["split"]) == {"train"}
    reasons = _delta_rows(out + "_quarantine")["reason"]
    assert sum(r.startswith("empty text") for r in reasons) == 1
    assert sum(r == "missing text" for r in reasons) == 2
    assert sum(r == "missing label" for r in reasons) == 1
    assert sum(r.startswith("label has the wrong type") for r in reasons) == 2
    assert sum(r.startswith("label out of range") for r in reasons) == 2
    assert sum(r.startswith("unparseable record") for r in reasons) == 1
    assert sum(r.startswith("exact duplicate") for r in reasons) == 1
    assert result.reasons["exact duplicate"] == 1


def test_jsonl_keeps_the_original_record_of_each_rejected_line(spark, bad_rows_dir, tmp_path):
    out = str(tmp_path / "raw")
    quarantine = str(tmp_path / "rejects")
    result = ingest(spark, str(bad_rows_dir / "reviews.jsonl"), out, quarantine=quarantine)
    _check_accounting(result, spark)
    assert (result.input_rows, result.raw_rows) == (8, 2)
    assert sorted(_delta_rows(out)["label"]) == [0, 1]
    rejects = _delta_rows(quarantine).set_index("reason")
    assert rejects.filter(like="unparseable", axis=0)["record"].iloc[0] == "this line is not JSON"
    wrong_type = rejects.filter(like="wrong type", axis=0)["record"]
    assert {json.loads(r)["text"] for r in wrong_type} == {"true label", "list label"}
    assert (rejects["source"] == str(bad_rows_dir / "reviews.jsonl")).all()


def test_aclimdb_folder_layout(spark, imdb_sample_path, tmp_path):
    acl = tmp_path / "aclImdb"
    for split in ("train", "test", "unsupervised"):
        frame = pd.read_parquet(os.path.join(imdb_sample_path, f"{split}.parquet")).head(12)
        for row in frame.itertuples():
            folder_split = "train" if split == "unsupervised" else split
            label_dir = {1: "pos", 0: "neg", -1: "unsup"}[row.label]
            target = acl / folder_split / label_dir
            target.mkdir(parents=True, exist_ok=True)
            (target / f"{row.id}_{row.rating}.txt").write_text(row.text, encoding="utf-8")
    assert detect_source(str(acl))[0] == "aclimdb"
    out = str(tmp_path / "raw")
    result = ingest(spark, str(acl), out)
    _check_accounting(result, spark)
    rows = _delta_rows(out)
    assert rows.groupby("split").size().to_dict() == {"test": 12, "train": 12, "unsupervised": 12}
    unsup = rows[rows.split == "unsupervised"]
    assert set(unsup["label"]) == {-1} and set(unsup["rating"]) == {0}
    source = pd.read_parquet(os.path.join(imdb_sample_path, "test.parquet")).head(12)
    merged = rows[rows.split == "test"].merge(source, on=["id", "rating", "label"], suffixes=("", "_src"))
    assert len(merged) == 12 and (merged["text"] == merged["text_src"]).all()


def test_existing_table_by_name_round_trips(spark, imdb_sample_path, tmp_path):
    spark.read.parquet(os.path.join(imdb_sample_path, "test.parquet")).write.format("delta").mode(
        "overwrite"
    ).saveAsTable("default.imdb_source")
    result = ingest(spark, "default.imdb_source", "default.imdb_raw", split="test")
    _check_accounting(result, spark)
    assert result.raw_rows == 100 and result.quarantine == "default.imdb_raw_quarantine"
    assert spark.table("default.imdb_raw").where("split = 'test'").count() == 100


def test_hf_dataset_offline_says_how_to_use_a_local_copy(spark, tmp_path):
    with pytest.raises(SparktuneError, match="local copy"):
        ingest(spark, "hf:stanfordnlp/imdb", str(tmp_path / "raw"))


def test_missing_source_and_bad_columns_are_clear_errors(spark, imdb_sample_path, tmp_path):
    with pytest.raises(SparktuneError, match="no such file or folder"):
        ingest(spark, str(tmp_path / "nope.parquet"), str(tmp_path / "raw"))
    with pytest.raises(SparktuneError, match="--text-column"):
        ingest(spark, imdb_sample_path, str(tmp_path / "raw"), text_column="review")


@pytest.mark.slow
def test_full_imdb_corpus(spark, imdb_dir, tmp_path, gpt2_tokenizer_path):
    from sparktune.stats import table_stats
    from sparktune.tokenize import tokenize_table

    raw = str(tmp_path / "raw")
    result = ingest(spark, imdb_dir, raw)
    assert result.input_rows == 100_000
    assert result.input_rows == result.raw_rows + result.quarantined_rows
    # IMDB repeats some reviews word for word within a split: those are the only rejects.
    assert set(result.reasons) <= {"exact duplicate"}
    tokens = str(tmp_path / "tokens")
    tokenize_table(spark, raw, tokens, gpt2_tokenizer_path, max_length=512)
    stats = table_stats(spark, tokens)
    assert stats["rows"] == result.raw_rows
    assert 200 < stats["splits"]["train"]["mean_tokens"] < 512
