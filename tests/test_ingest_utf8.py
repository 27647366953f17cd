"""Issue 18: invalid UTF-8, repeated JSON keys and credentials in quarantined records, per source kind.

A review saved in Latin-1 (``caf\\xe9 cr\\xe8me``) must never reach the raw table: each source kind
(aclImdb files, CSV, JSONL, Parquet string and binary columns) quarantines that row with the
reason "not valid UTF-8" and keeps its neighbours. The tables are read back with pyarrow
(deltalake), which refuses invalid UTF-8 in a string column.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable

from sparktune.cli import main

LATIN1 = "café crème, a fine film".encode("latin-1")  # b"caf\xe9 cr\xe8me ..."
NOT_UTF8 = "not valid UTF-8"


def _ingest(source, out):
    assert main(["ingest", "--source", str(source), "--output", str(out)]) == 0
    # pyarrow decodes every string of the raw table: it raises on one invalid byte.
    raw = DeltaTable(str(out)).to_pyarrow_table()
    quarantine = DeltaTable(str(out) + "_quarantine").to_pyarrow_table()
    for table in (raw, quarantine):
        for column in table.columns:
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                column.validate(full=True)
    return raw.to_pandas(), quarantine.to_pandas()


def test_aclimdb_latin1_review_is_quarantined_and_the_path_token_redacted(spark, tmp_path, gpt2_tokenizer_path):
    token = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2"
    root = tmp_path / token / "aclImdb"
    for split in ("train", "test"):
        (root / split / "pos").mkdir(parents=True)
        (root / split / "pos" / "1_9.txt").write_text(f"a fine {split} review", encoding="utf-8")
    (root / "train" / "pos" / "2_8.txt").write_bytes(LATIN1)
    (root / "train" / "pos" / "badly-named.txt").write_text("misnamed", encoding="utf-8")
    raw, quarantine = _ingest(root, tmp_path / "raw")
    assert sorted(raw["text"]) == ["a fine test review", "a fine train review"]
    reasons = dict(zip(quarantine["reason"].str.slice(0, 15), quarantine["record"]))
    assert set(reasons) == {NOT_UTF8, "file name is no"}
    assert "caf\ufffd cr\ufffdme" in json.loads(reasons[NOT_UTF8])["text"]  # shown repaired, reason kept
    for frame in (raw, quarantine):
        assert not frame.astype(str).apply(lambda col: col.str.contains(token)).any().any()
    # The raw table tokenizes (it died in a Spark task before).
    assert main(["tokenize", "--input", str(tmp_path / "raw"), "--output", str(tmp_path / "tok"),
                 "--tokenizer", gpt2_tokenizer_path, "--max-length", "16"]) == 0


def test_csv_and_jsonl_decide_per_row(spark, tmp_path):
    csv = b"text,label\n" + b'"good one",1\n' + b'"' + LATIN1 + b'",0\n' + b'"another good",0\n'
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "train.csv").write_bytes(csv)
    raw, quarantine = _ingest(tmp_path / "csv" / "train.csv", tmp_path / "raw_csv")
    assert sorted(raw["text"]) == ["another good", "good one"]
    assert list(quarantine["reason"].str.slice(0, 15)) == [NOT_UTF8]
    assert "caf\ufffd" in quarantine["record"].iloc[0]

    lines = [json.dumps({"text": "good", "label": 1}).encode(), b'{"text": "' + LATIN1 + b'", "label": 0}',
             json.dumps({"text": "also good", "label": 0}).encode()]
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    raw, quarantine = _ingest(tmp_path / "train.jsonl", tmp_path / "raw_json")
    assert sorted(raw["text"]) == ["also good", "good"]
    assert list(quarantine["reason"].str.slice(0, 15)) == [NOT_UTF8]


def test_parquet_string_and_binary_columns(spark, tmp_path):
    texts = [b"good text", LATIN1, "naïve but valid".encode()]
    binary = pa.array(texts, pa.binary())
    table = pa.table({"text": binary.view(pa.string()), "label": [1, 0, 1]})  # no validation: bytes as they are
    pq.write_table(table, tmp_path / "strings.parquet")
    raw, quarantine = _ingest(tmp_path / "strings.parquet", tmp_path / "raw_str")
    assert sorted(raw["text"]) == ["good text", "naïve but valid"]
    assert list(quarantine["reason"].str.slice(0, 15)) == [NOT_UTF8]

    pq.write_table(pa.table({"text": binary, "label": [1, 0, 1]}), tmp_path / "binary.parquet")
    raw, quarantine = _ingest(tmp_path / "binary.parquet", tmp_path / "raw_bin")
    assert sorted(raw["text"]) == ["good text", "naïve but valid"]  # valid UTF-8 bytes are text
    assert list(quarantine["reason"].str.slice(0, 15)) == [NOT_UTF8]


def test_json_repeated_key_is_quarantined_with_that_reason(spark, tmp_path):
    lines = ['{"text": "a", "text": "b", "label": 1}', '{"text": "fine", "label": 0}',
             '{"text": "nested", "label": 1, "meta": {"k": 1, "k": 2}}', '{"text": "broken", "label": ']
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    raw, quarantine = _ingest(tmp_path / "train.jsonl", tmp_path / "raw")
    assert list(raw["text"]) == ["fine"]
    by_record = dict(zip(quarantine["record"], quarantine["reason"]))
    assert by_record[lines[0]].startswith("repeated key: the object repeats text")
    assert by_record[lines[2]].startswith("repeated key inside a nested object")
    assert by_record[lines[3]] == "unparseable record: the line is not valid JSON"


def test_csv_header_repeating_a_column_is_refused(spark, tmp_path, capfd):
    (tmp_path / "train.csv").write_text("text,label,text\nx,1,y\n")
    capfd.readouterr()
    assert main(["ingest", "--source", str(tmp_path / "train.csv"), "--output", str(tmp_path / "raw")]) == 2
    assert "repeats the column(s) ['text']" in capfd.readouterr().err
