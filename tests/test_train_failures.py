"""Rank failures reach the user whole, and failures no retry can fix are not retried."""

import errno
import glob
import logging
import os
import re

import pytest
from test_train_support import nest, tiny_gpt2_overrides, write_tokenized_table
from train_faults import kill_switch


def test_failures_classified_from_real_errors(tmp_path):
    from sparktune.errors import ConfigError
    from sparktune.train.failures import DataFilesGone, classify

    with pytest.raises(OSError) as full:  # a real ENOSPC: /dev/full is a disk that is always full
        with open("/dev/full", "w") as handle:
            handle.write("x")
            handle.flush()
    assert full.value.errno == errno.ENOSPC
    assert classify(full.value) == (False, "disk full")
    try:
        try:
            raise full.value
        except OSError as exc:
            raise RuntimeError("saving checkpoint failed") from exc
    except RuntimeError as wrapped:
        assert classify(wrapped)[0] is False  # the cause counts
    assert classify(ConfigError(["a: b"])) == (False, "user error")
    assert classify(DataFilesGone("gone"))[0] is False
    assert classify(RuntimeError("Connection closed by peer"))[0] is True


def test_failure_record_round_trip_keeps_every_line(tmp_path):
    from sparktune.errors import ConfigError
    from sparktune.train.failures import read_failures, record_failure, user_error

    problems = ["model.num_labels: is 2, but labels [3] are outside 0..1", "model.name: token id 5000 >= 1000"]
    for rank in (0, 1):
        try:
            raise ConfigError(problems)
        except ConfigError as exc:
            record_failure(str(tmp_path), rank, 2, exc)
    records = read_failures(str(tmp_path))
    assert [r.rank for r in records] == [0, 1] and not any(r.retriable for r in records)
    assert "raise ConfigError(problems)" in records[0].traceback
    error = user_error(records)
    assert isinstance(error, ConfigError) and error.problems == problems
    assert str(error).splitlines() == ["2 configuration problem(s) in training ranks 0, 1 of 2:",
                                       f"  - {problems[0]}", f"  - {problems[1]}"]


@pytest.mark.timeout(300)
def test_vacuumed_data_file_is_a_clear_error_not_a_retry(tmp_path, gpt2_tokenizer_path, monkeypatch):
    from sparktune.errors import SparktuneError
    from sparktune.train.config import load_train_config
    from sparktune.train.failures import read_failures
    from sparktune.train.recipe import train

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    table = write_tokenized_table(tmp_path / "tok", gpt2_tokenizer_path, task="causal-lm", n_train=8, n_test=2,
                                  max_length=16)
    for path in glob.glob(os.path.join(table, "*.parquet")):  # what VACUUM does to an old version's files
        os.remove(path)
    cfg = load_train_config(data=nest(tiny_gpt2_overrides(tmp_path, table, "", **{
        "mlflow.enabled": False, "distributor.num_processes": 1, "train.max_steps": 1})))
    with pytest.raises(SparktuneError, match=r"data.table: a data file of .* v1 is gone .* VACUUM"):
        train(cfg)
    (record,) = read_failures(cfg.checkpoint_dir)
    assert record.retriable is False and record.reason == "data files gone"


def _bad_labels(split, row_id, label):
    return 3 if split == "train" and row_id % 5 == 0 else label


@pytest.mark.timeout(400)
def test_multiline_config_error_in_ranks_reaches_the_user_whole(spark, tmp_path, gpt2_tokenizer_path, mlflow_uri,
                                                                 caplog):
    """Two gloo ranks find problems only the built model shows (its vocabulary against both splits'
    token ids: bad labels are already refused on the driver when Spark stages the shards); the
    user gets every line and nothing is relaunched."""
    from sparktune.errors import ConfigError
    from sparktune.train.config import load_train_config
    from sparktune.train.distribute import run_training
    from sparktune.train.failures import read_failures

    table = write_tokenized_table(tmp_path / "tok", gpt2_tokenizer_path, task="classification", n_train=12, n_test=2,
                                  max_length=16)
    overrides = tiny_gpt2_overrides(tmp_path, table, mlflow_uri, **{
        "model.task": "classification", "model.num_labels": 2, "data.eval_split": "test",
        "model.config_overrides": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2,
                                   "n_positions": 32, "vocab_size": 1000},
        "distributor.max_restarts": 2, "mlflow.log_model": False})
    cfg = load_train_config(data=nest(overrides))
    with caplog.at_level(logging.WARNING, logger="sparktune.train"), pytest.raises(ConfigError) as info:
        run_training(cfg, spark)
    lines = str(info.value).splitlines()
    assert lines[0] == "2 configuration problem(s) in training ranks 0, 1 of 2:", lines
    assert lines[1].startswith("  - model.name: the model has 1000 token embeddings, but split 'train'"), lines
    assert lines[2].startswith("  - model.name: the model has 1000 token embeddings, but split 'test'"), lines
    assert not [r for r in caplog.records if "relaunching" in r.getMessage()]  # a user error is not retried
    assert {r.rank for r in read_failures(cfg.checkpoint_dir)} == {0, 1}

    import mlflow

    run = mlflow.MlflowClient(mlflow_uri).get_run(cfg.mlflow.run_id)
    assert run.info.status == "FAILED"


def test_bad_labels_are_refused_on_the_driver_before_any_rank_starts(spark, tmp_path, gpt2_tokenizer_path,
                                                                      mlflow_uri):
    from sparktune.errors import SparktuneError
    from sparktune.train.config import load_train_config
    from sparktune.train.distribute import run_training
    from sparktune.train.failures import read_failures

    table = write_tokenized_table(tmp_path / "tok", gpt2_tokenizer_path, task="classification", n_train=12, n_test=2,
                                  max_length=16, relabel=_bad_labels)
    cfg = load_train_config(data=nest(tiny_gpt2_overrides(tmp_path, table, mlflow_uri, **{
        "model.task": "classification", "model.num_labels": 2, "data.eval_split": "", "mlflow.log_model": False})))
    with pytest.raises(SparktuneError, match=r"model\.num_labels: .* labels from 0 to 3"):
        run_training(cfg, spark)
    assert not read_failures(cfg.checkpoint_dir)  # no rank ran


@pytest.mark.timeout(400)
def test_after_the_last_restart_the_user_gets_a_message_not_a_traceback(spark, tmp_path, gpt2_tokenizer_path,
                                                                        monkeypatch):
    from sparktune.errors import SparktuneError
    from sparktune.train.config import load_train_config
    from sparktune.train.distribute import run_training

    kill_switch(monkeypatch, 1)
    table = write_tokenized_table(tmp_path / "tok", gpt2_tokenizer_path, task="causal-lm", n_train=8, n_test=2,
                                  max_length=16)
    cfg = load_train_config(data=nest(tiny_gpt2_overrides(tmp_path, table, "", **{
        "mlflow.enabled": False, "distributor.max_restarts": 0, "data.eval_split": "",
        "model.config_overrides": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2,
                                   "n_positions": 32}})))
    with pytest.raises(SparktuneError) as info:
        run_training(cfg, spark)
    message = str(info.value)
    assert message.startswith("training failed on all 1 launch(es) (distributor.max_restarts=0):"), message
    # The SIGKILLed rank is named. Rank 0 is named too when torchrun's agent stops it (SIGTERM, then
    # SIGKILL) before it notices the lost peer and writes its own record: that is a race, not a bug.
    assert re.search(r"launch 1: rank\(s\) (0, )?1 died without a failure record", message), message
    assert "no complete checkpoint was written" in message
    assert "Traceback" not in message
