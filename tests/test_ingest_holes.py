"""Issue 8, input that slips through or is lost: each case a real file ingested into real Delta tables.

Every test checks the accounting identity against a count of the source made here without
Spark (lines, csv records, Parquet footers, files), and that no raw row has a null split,
text or label.
"""

import io
import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from sparktune.errors import SparktuneError
from sparktune.ingest import ingest
from sparktune.staging import stage_training_data
from sparktune.tables import table_properties
from sparktune.tasks import TOKENIZED
from sparktune.tokenize import tokenize_table


def _rows(path):
    return DeltaTable(str(path)).to_pandas()


def _check(result, expected_records):
    assert result.input_rows == expected_records
    assert result.raw_rows + result.quarantined_rows == expected_records
    raw = _rows(result.output)
    quarantine = _rows(result.quarantine)
    assert (len(raw), len(quarantine)) == (result.raw_rows, result.quarantined_rows)
    assert raw[["split", "text", "label"]].notna().all().all()
    assert quarantine["reason"].notna().all()
    return raw, quarantine


def _reason_of(quarantine, marker):
    hits = quarantine[quarantine["record"].str.contains(marker, regex=False)]
    assert len(hits) == 1, (marker, hits)
    return hits["reason"].iloc[0]


JSONL_CASES = [
    # (record, expected: a reason prefix or ("kept", split, label))
    ({"text": "null split", "label": 1, "split": None}, "missing split"),
    ({"text": "blank split", "label": 1, "split": " \t\u00a0"}, "missing split"),
    ({"text": "no split key", "label": 1}, "missing split"),
    ({"text": "split number", "label": 1, "split": 3}, "split has the wrong type"),
    ({"text": "own split kept", "label": 0, "split": "validation"}, ("kept", "validation", 0)),
    ({"text": "null label", "label": None, "split": "train"}, "missing label"),
    ({"text": None, "label": 1, "split": "train", "marker": "null text"}, "missing text"),
    ({"label": 1, "split": "train", "marker": "no text key"}, "missing text"),
    ({"text": "huge label", "label": 99999999999, "split": "train"}, "label out of range"),
    ({"text": "huger label", "label": "99999999999999999999999", "split": "train"}, "label out of range"),
    ({"text": "float label", "label": 1.0, "split": "train"}, ("kept", "train", 1)),
    ({"text": "float string label", "label": "0.0", "split": "train"}, ("kept", "train", 0)),
    ({"text": "nan label", "label": "NaN", "split": "train"}, "label has the wrong type"),
    ({"text": "one and a half", "label": 1.5, "split": "train"}, "label has the wrong type"),
    ({"text": "exponent label", "label": "1e0", "split": "train"}, ("kept", "train", 1)),
    ({"text": "\t\n\r\u00a0\u2003\u3000\u200b\ufeff\u0000", "label": 1, "split": "train", "marker": "blank text"},
     "empty text"),
    ({"text": "padded label", "label": "\t1\u00a0\u3000", "split": "train"}, ("kept", "train", 1)),
    ({"text": "padded name label", "label": " Positive\n", "split": "train"}, ("kept", "train", 1)),
    ({"text": "label two", "label": 2, "split": "train"}, "label out of range"),
    ({"text": "negative out of range", "label": -2, "split": "train"}, "label out of range"),
    ({"text": "unsup without label", "split": "unsupervised"}, ("kept", "unsupervised", -1)),
    ({"text": "unsup blank label", "label": "\u3000", "split": "unsupervised"}, ("kept", "unsupervised", -1)),
    ({"text": 5, "label": 1, "split": "train", "marker": "number text"}, "text has the wrong type"),
    ({"text": "nested label", "label": {"a": 1}, "split": "train"}, "label has the wrong type"),
    ({"text": "bool label", "label": True, "split": "train"}, "label has the wrong type"),
    ({"text": "nul \u0000 inside is kept", "label": 1, "split": "train"}, ("kept", "train", 1)),
    ({"text": "tab\tand newline\ninside are kept", "label": 0, "split": "train"}, ("kept", "train", 0)),
]
RAW_LINES = [
    ("[1, 2]", "unparseable record"),
    ("null", None),
    ('{"text": "bare NaN", "label": NaN, "split": "train"}', "unparseable record"),
    ("   \t", "empty record"),
    ("", "empty record"),
    ('{"text": "dup key", "text": "dup key 2", "label": 1, "split": "train"}', None),  # either way, accounted
]


def test_jsonl_nulls_labels_whitespace_and_types_each_have_an_exact_reason(spark, tmp_path):
    source = tmp_path / "cases.jsonl"
    lines = [json.dumps(record, ensure_ascii=False) for record, _ in JSONL_CASES] + [line for line, _ in RAW_LINES]
    # CR and CRLF end lines too: the count here uses the same three line ends.
    source.write_bytes(("\n".join(lines[:-2]) + "\r\n" + lines[-2] + "\r" + lines[-1] + "\n").encode("utf-8"))
    records = len(io.TextIOWrapper(io.BytesIO(source.read_bytes()), newline=None).readlines())
    assert records == len(JSONL_CASES) + len(RAW_LINES)
    result = ingest(spark, str(source), str(tmp_path / "raw"))
    raw, quarantine = _check(result, records)
    for record, expected in JSONL_CASES:
        marker = record.get("marker") or record["text"]
        if isinstance(expected, tuple):
            row = raw[raw["text"] == record["text"]]
            assert len(row) == 1, (marker, quarantine[quarantine.record.str.contains(marker[:8], regex=False)])
            assert (row["split"].iloc[0], row["label"].iloc[0]) == expected[1:], marker
        else:
            assert _reason_of(quarantine, json.dumps(marker, ensure_ascii=False)[1:-1]).startswith(expected), marker
    for line, expected in RAW_LINES:
        if expected and line.strip():
            assert _reason_of(quarantine, line).startswith(expected), line
    assert (quarantine["reason"].str.startswith("empty record")).sum() == 2
    assert result.reasons["missing split"] == 3


def test_split_files_keep_their_own_split_column_and_csv_quotes_are_accounted(spark, tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    # pandas writes 1.0 for an int column with a missing value, which Parquet stores as null.
    frame = pd.DataFrame({
        "text": ["parquet own split", "parquet null split", "parquet float", "parquet nan", "parquet half"],
        "label": [1.0, 0.0, 0.0, float("nan"), 1.5],
        "split": ["validation", None, "train", "train", "train"],
        "nested": [{"a": 1}, {"a": 2}, None, {"a": 3}, {"a": 4}],
    })
    frame.to_parquet(folder / "train.parquet")
    (folder / "test.csv").write_text(
        'text,label\n'
        '"multi\nline review",1\n'
        '"stray quote,0\n'
        'next good,1\n'
        '"another ""quoted"" one",0\n'
        'too,many,fields\n'
        '\n'
        'last good,0\n',
        encoding="utf-8",
    )
    # By hand: multi-line, stray quote, next good, another, too many, blank line, last good.
    csv_records = 7
    expected = pq.ParquetFile(folder / "train.parquet").metadata.num_rows + csv_records
    result = ingest(spark, str(folder), str(tmp_path / "raw"))
    raw, quarantine = _check(result, expected)
    kept = raw.set_index("text")
    assert kept.loc["parquet own split", "split"] == "validation"  # not overwritten by the file name
    assert kept.loc["parquet float", ["split", "label"]].tolist() == ["train", 0]
    assert json.loads(kept.loc["parquet own split", "nested"]) == {"a": 1}
    assert _reason_of(quarantine, "parquet null split") == "missing split"
    assert _reason_of(quarantine, "parquet nan") == "missing label"
    assert _reason_of(quarantine, "parquet half").startswith("label has the wrong type")
    # CSV: the embedded newline is one record; the stray quote costs its own line only.
    assert kept.loc["multi\nline review", ["split", "label"]].tolist() == ["test", 1]
    assert {"next good", 'another "quoted" one', "last good"} <= set(kept.index)
    stray = _reason_of(quarantine, "stray quote")
    assert stray.startswith("unparseable record: line 4") and "unbalanced quote" in stray
    assert _reason_of(quarantine, "too,many").startswith("unparseable record: line 7 has 3 fields")
    assert (quarantine["reason"] == "empty record (blank line)").sum() == 1


def test_csv_quote_running_to_the_end_of_the_file_swallows_nothing(spark, tmp_path):
    source = tmp_path / "runaway.csv"
    source.write_text('text,label\ngood one,1\n"runaway,1\nnext,0\nlast,0', encoding="utf-8")
    result = ingest(spark, str(source), str(tmp_path / "raw"))
    raw, quarantine = _check(result, 4)
    assert sorted(raw["text"]) == ["good one", "last", "next"]
    assert _reason_of(quarantine, "runaway").startswith("unparseable record: line 3")


def test_aclimdb_badly_named_files_are_quarantined_one_by_one_under_ansi(spark, tmp_path):
    assert spark.conf.get("spark.sql.ansi.enabled") == "true"
    acl = tmp_path / "aclImdb"
    names = {
        ("train", "pos"): ["1_10.txt", "review.txt", "2_x.txt"],
        ("train", "neg"): ["3_1.txt", "99999999999999999999999_2.txt"],
        ("test", "unsup"): ["4_0.txt"],
    }
    for (split, label), files in names.items():
        (acl / split / label).mkdir(parents=True)
        for name in files:
            (acl / split / label / name).write_text(f"review {name}", encoding="utf-8")
    (acl / "train" / "pos" / "_hidden.txt").write_text("not a record", encoding="utf-8")
    result = ingest(spark, str(acl), str(tmp_path / "raw"))
    raw, quarantine = _check(result, 6)
    assert sorted(raw["text"]) == ["review 1_10.txt", "review 3_1.txt", "review 4_0.txt",
                                   "review 99999999999999999999999_2.txt"]
    kept = raw.set_index("text")
    assert kept.loc["review 4_0.txt", "split"] == "unsupervised" and kept.loc["review 4_0.txt", "label"] == -1
    # An id too big for a long is a null id, not an aborted job.
    assert pd.isna(kept.loc["review 99999999999999999999999_2.txt", "id"])
    assert sorted(quarantine["reason"]) == ["file name is not <id>_<rating>.txt: found 2_x.txt",
                                            "file name is not <id>_<rating>.txt: found review.txt"]


def test_labels_outside_num_labels_are_quarantined_and_check_labels_catches_them(spark, gpt2_tokenizer_path,
                                                                                 tmp_path):
    source = tmp_path / "three.jsonl"
    source.write_text("\n".join(json.dumps({"text": f"review {i}", "label": i % 3}) for i in range(9)) + "\n")
    result = ingest(spark, str(source), str(tmp_path / "raw"), num_labels=2)
    raw, _ = _check(result, 9)
    assert set(raw["label"]) == {0, 1} and result.reasons == {"label out of range": 3}
    wide = ingest(spark, str(source), str(tmp_path / "raw3"), num_labels=3)
    tokens = str(tmp_path / "tokens3")
    tokenized = tokenize_table(spark, wide.output, tokens, gpt2_tokenizer_path, max_length=16)
    staging = str(tmp_path / "staging")
    # The one label check (sparktune.staging.check_labels) refuses the labels before any rank starts.
    with pytest.raises(SparktuneError, match=r"labels from 0 to 2, but model.num_labels=2"):
        stage_training_data(spark, tokens, tokenized.version, "train", 1, seed=0, staging_dir=staging, num_labels=2)
    staged = stage_training_data(spark, tokens, tokenized.version, "train", 1, seed=0, staging_dir=staging,
                                 num_labels=3)
    assert (staged.manifest.rows, staged.manifest.label_min, staged.manifest.label_max) == (9, 0, 2)


def test_every_argument_is_checked_before_the_first_write(spark, imdb_sample_path, tmp_path):
    out = str(tmp_path / "raw")
    first = ingest(spark, imdb_sample_path, out)
    history = len(DeltaTable(out).history())
    for bad in ("not a name!", out):  # invalid, and the output itself
        with pytest.raises(SparktuneError):
            ingest(spark, imdb_sample_path, out, quarantine=bad)
    stray = tmp_path / "not_delta"
    stray.mkdir()
    (stray / "keep.txt").write_text("mine")
    with pytest.raises(SparktuneError, match="no Delta table"):
        ingest(spark, imdb_sample_path, out, quarantine=str(stray))
    with pytest.raises(SparktuneError, match="schema 'no_such_db' does not exist"):
        ingest(spark, imdb_sample_path, out, quarantine="no_such_db.rejects")
    assert len(DeltaTable(out).history()) == history and (stray / "keep.txt").exists()
    props = table_properties(spark, out)
    assert props["sparktune.run_id"] == first.run_id
    assert props["sparktune.quarantine_version"] == str(first.quarantine_version)
    assert table_properties(spark, first.quarantine)["sparktune.run_id"] == first.run_id


def test_counts_that_disagree_with_the_source_refuse_to_write(spark, tmp_path, monkeypatch):
    """Fault injection: the independent count says 4 (the file counted twice), Spark reads 2."""
    from sparktune.ingest import files_reader as ingest_module

    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), folder / "part-0.parquet")
    real = ingest_module.count_source_records
    monkeypatch.setattr(ingest_module, "count_source_records", lambda files: real({k: v * 2 for k, v in files.items()}))
    with pytest.raises(SparktuneError, match=r"4 records \(Parquet footers\) but 2 were read.*nothing was written"):
        ingest(spark, str(folder), str(tmp_path / "raw"))
    assert not os.path.exists(tmp_path / "raw") and not os.path.exists(tmp_path / "raw_quarantine")


def test_stats_shows_null_splits_and_labels_instead_of_crashing(spark, tmp_path):
    from sparktune.stats import format_stats, plot_token_lengths, table_stats

    table = str(tmp_path / "foreign_tokens")
    spark.createDataFrame(
        [("a", "train", 1, [1, 2], 2, False), ("b", None, None, [3], 1, False), ("c", "test", 0, None, None, None)],
        TOKENIZED.schema,
    ).write.format("delta").save(table)
    stats = table_stats(spark, table)
    assert stats["rows"] == 3 and stats["splits"]["<null>"]["labels"] == {"None": 1}
    assert "<null>" in format_stats(stats)
    assert plot_token_lengths(spark, table, str(tmp_path / "h.png"))["series"]["<null>"] == {1: 1}


def test_spark_and_python_call_the_same_characters_blank(spark):
    """The blank rule Spark applies (``blank_java``, ``trim_java``) and the Python oracle
    (``is_blank``) agree on every code point, whatever Unicode version the JVM knows: Java 17's
    own ``\\p{Cf}`` missed U+0890/U+0891 (format characters since Unicode 14), so a split of
    "\\u0890" was kept by Spark and called blank by Python (a failing property test in CI)."""
    from pyspark.sql import functions as F

    from sparktune.ingest.rules import blank_java, is_blank, trim_java

    chars = (spark.range(0, 0x110000).where("id < 55296 OR id > 57343")  # no surrogates
             .select("id", F.decode(F.unhex(F.lpad(F.hex("id"), 8, "0")), "UTF-32").alias("c")))
    spark_blank = {r["id"] for r in chars.where(F.col("c").rlike(blank_java())).select("id").collect()}
    python_blank = {c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and is_blank(chr(c))}
    assert spark_blank == python_blank and {0x20, 0xA0, 0x200B, 0xFEFF, 0x890, 0x891} <= spark_blank
    trimmed = (chars.where(F.col("id").isin(*sorted(python_blank)))
               .select(F.regexp_replace(F.concat(F.col("c"), F.lit("a"), F.col("c")), trim_java(), "").alias("t"))
               .distinct().collect())
    assert [r["t"] for r in trimmed] == ["a"]
