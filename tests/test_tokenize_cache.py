"""Issue 8, caches that go stale: tokenize's "up to date" must notice a recreated source, an
outside change to its own output and a new sparktune version."""

import json
import shutil

from deltalake import DeltaTable

import sparktune
from sparktune.ingest import ingest
from sparktune.tables import table_properties
from sparktune.tokenize import tokenize_table


def _jsonl(path, texts):
    path.write_text("\n".join(json.dumps({"text": t, "label": i % 2}) for i, t in enumerate(texts)) + "\n")
    return str(path)


def test_recreated_source_outside_change_and_new_version_each_rebuild(
    spark, gpt2_tokenizer_path, tmp_path, monkeypatch
):
    raw = str(tmp_path / "raw")
    tokens = str(tmp_path / "tokens")
    ingest(spark, _jsonl(tmp_path / "a.jsonl", ["first corpus one", "first corpus two"]), raw)
    first = tokenize_table(spark, raw, tokens, gpt2_tokenizer_path, max_length=16)
    props = table_properties(spark, tokens)
    assert props["sparktune.source_table_id"] == DeltaTable(raw).metadata().id
    assert props["sparktune.sparktune_version"] == sparktune.__version__
    assert tokenize_table(spark, raw, tokens, gpt2_tokenizer_path, max_length=16).skipped

    # Drop the source and ingest other data: same location, version 0 again, another table id.
    shutil.rmtree(raw)
    shutil.rmtree(raw + "_quarantine")
    ingest(spark, _jsonl(tmp_path / "b.jsonl", ["second corpus, three rows", "x", "y"]), raw)
    assert DeltaTable(raw).version() == 0
    rebuilt = tokenize_table(spark, raw, tokens, gpt2_tokenizer_path, max_length=16)
    assert not rebuilt.skipped and rebuilt.version == first.version + 1
    assert len(DeltaTable(tokens).to_pandas()) == 3

    # Someone deletes rows of the output: its properties still match, its content does not.
    assert tokenize_table(spark, raw, tokens, gpt2_tokenizer_path, max_length=16).skipped
    spark.sql(f"DELETE FROM delta.`{tokens}` WHERE n_tokens < 3")
    assert len(DeltaTable(tokens).to_pandas()) < 3
    repaired = tokenize_table(spark, raw, tokens, gpt2_tokenizer_path, max_length=16)
    assert not repaired.skipped and len(DeltaTable(tokens).to_pandas()) == 3

    # A new sparktune release may tokenize differently.
    monkeypatch.setattr(sparktune, "__version__", sparktune.__version__ + ".post1")
    upgraded = tokenize_table(spark, raw, tokens, gpt2_tokenizer_path, max_length=16)
    assert not upgraded.skipped
    assert table_properties(spark, tokens)["sparktune.sparktune_version"].endswith(".post1")
