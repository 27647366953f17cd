"""Resume: the pinned data version, verified checkpoints, and the world size (one process, no Spark,
except the launcher's world-size check)."""

import os

import pytest
from test_train_support import nest, tiny_gpt2_overrides, write_tokenized_table


@pytest.fixture
def single_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


def _cfg(tmp_path, table, **extra):
    from sparktune.train.config import load_train_config

    flat = tiny_gpt2_overrides(tmp_path, table, "", **{
        "mlflow.enabled": False, "data.eval_split": "", "train.batch_size": 2, "checkpoint.steps": 2,
        "checkpoint.keep": 3, "distributor.num_processes": 1, "train.num_threads": 1, **extra})
    return load_train_config(data=nest(flat))


def _append_rows(table: str) -> int:
    from deltalake import DeltaTable, write_deltalake

    rows = DeltaTable(table).to_pyarrow_table().slice(0, 4)
    write_deltalake(table, rows, mode="append")
    return DeltaTable(table).version()


@pytest.mark.timeout(300)
def test_resume_continues_on_the_pinned_version_and_refuses_another(tmp_path, gpt2_tokenizer_path, single_process):
    from sparktune.errors import ConfigError
    from sparktune.train.recipe import train

    table = write_tokenized_table(tmp_path / "tok", gpt2_tokenizer_path, task="causal-lm", n_train=12, n_test=2,
                                  max_length=24)
    first = train(_cfg(tmp_path, table, **{"train.max_steps": 2}))
    assert first.version == 1 and first.global_step == 2
    assert _append_rows(table) == 2  # the table moves on while the job is stopped

    resumed = train(_cfg(tmp_path, table, **{"train.max_steps": 4, "resume": True}))
    assert resumed.version == 1, "resume must continue on the version the job pinned, not the latest"
    assert resumed.resumed_from.endswith("checkpoint-2") and resumed.global_step == 4
    assert resumed.train_rows == first.train_rows

    with pytest.raises(ConfigError) as info:
        train(_cfg(tmp_path, table, **{"train.max_steps": 6, "resume": True, "data.version": 2}))
    message = str(info.value)
    assert "data.version: resume=true continues the job" in message and "v1" in message
    assert "data.version=2 was asked" in message


@pytest.mark.timeout(300)
def test_ranks_train_on_the_job_pinned_before_they_start(tmp_path, gpt2_tokenizer_path, single_process, mlflow_uri):
    """The ranks take the table version, task, run and start point from the PinnedJob they are
    handed, even when the table moved on meanwhile; the config is never changed."""
    import copy
    import dataclasses

    import mlflow

    from sparktune.tasks import Task
    from sparktune.tracking import Tracker
    from sparktune.train.checkpoints import CheckpointStore
    from sparktune.train.pinned import ResumeDecision, open_job_run, pin_job
    from sparktune.train.recipe import train

    table = write_tokenized_table(tmp_path / "tok", gpt2_tokenizer_path, task="causal-lm", n_train=12, n_test=2,
                                  max_length=24)
    cfg = _cfg(tmp_path, table, **{"train.max_steps": 2, "mlflow.enabled": True, "mlflow.tracking_uri": mlflow_uri,
                                   "mlflow.log_model": False})
    before = copy.deepcopy(cfg)
    tracker = Tracker(mlflow_uri, cfg.mlflow.experiment)
    pinned = open_job_run(pin_job(cfg, 1), cfg, tracker)
    assert pinned.table.version == 1 and pinned.task is Task.CAUSAL_LM and pinned.resume == ResumeDecision()
    assert pinned.run_id and CheckpointStore(pinned.checkpoint_dir).read_job() == pinned.record()
    assert _append_rows(table) == 2  # a new commit after the job was pinned

    result = train(cfg, tracker=tracker, pinned=pinned)
    assert (result.version, result.task, result.run_id) == (1, Task.CAUSAL_LM, pinned.run_id)
    assert result.train_rows == 12 and result.resumed_from is None
    run = mlflow.MlflowClient(mlflow_uri).get_run(pinned.run_id)
    assert run.data.params["data.version"] == "1" and run.data.params["model.task"] == "causal-lm"
    assert cfg == before and cfg.model.task == "auto" and cfg.data.version is None and cfg.mlflow.run_id == ""

    # A relaunch is the same job with another start: the ranks resume where they are told.
    checkpoint = CheckpointStore(pinned.checkpoint_dir).latest_complete(1)
    assert checkpoint is not None and checkpoint.endswith("checkpoint-2")
    again = train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=4)), tracker=tracker,
                  pinned=dataclasses.replace(pinned, resume=ResumeDecision(checkpoint)))
    assert again.resumed_from == checkpoint and again.global_step == 4 and again.version == 1
    assert cfg == before


@pytest.mark.timeout(400)
def test_corrupt_newest_checkpoint_falls_back_and_world_size_change_is_refused(
        spark, tmp_path, gpt2_tokenizer_path, single_process):
    from sparktune.errors import ConfigError
    from sparktune.train.checkpoints import CheckpointStore, verify_checkpoint
    from sparktune.train.distribute import run_training
    from sparktune.train.recipe import train

    table = write_tokenized_table(tmp_path / "tok", gpt2_tokenizer_path, task="causal-lm", n_train=12, n_test=2,
                                  max_length=24)
    first = train(_cfg(tmp_path, table, **{"train.max_steps": 4}))
    store = CheckpointStore(first.checkpoint_dir)
    assert [step for step, _ in store.checkpoints()] == [4, 2]
    assert verify_checkpoint(os.path.join(first.checkpoint_dir, "checkpoint-4")) == []

    # A crash (or a full disk) left the newest optimizer file cut short.
    optimizer = os.path.join(first.checkpoint_dir, "checkpoint-4", "optimizer.pt")
    with open(optimizer, "r+b") as handle:
        handle.truncate(os.path.getsize(optimizer) // 2)
    assert any("optimizer.pt" in p for p in verify_checkpoint(os.path.dirname(optimizer)))
    assert store.latest_complete(1).endswith("checkpoint-2")

    resumed = train(_cfg(tmp_path, table, **{"train.max_steps": 6, "resume": True}))
    assert resumed.resumed_from.endswith("checkpoint-2") and resumed.global_step == 6
    assert os.path.isdir(os.path.join(first.checkpoint_dir, "corrupt-checkpoint-4"))  # kept aside, not reused
    assert store.latest_complete(1).endswith("checkpoint-6")

    # Two processes cannot continue checkpoints one process wrote: refused before anything launches.
    with pytest.raises(ConfigError, match=r"distributor.num_processes: is 2, but the checkpoints in .* were "
                                          r"written by 1 process"):
        run_training(_cfg(tmp_path, table, **{"train.max_steps": 8, "resume": True,
                                              "distributor.num_processes": 2}), spark)
