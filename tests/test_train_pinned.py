"""The pinned job: decided once from the config and the table (no Spark, no ranks), never by changing the config."""

import copy
import pickle

import pytest
from test_train_support import nest, tiny_gpt2_overrides, write_tokenized_table


def _cfg(tmp_path, table, **extra):
    from sparktune.train.config import load_train_config

    flat = tiny_gpt2_overrides(tmp_path, table, "", **{"mlflow.enabled": False, "distributor.num_processes": 2,
                                                      **extra})
    return load_train_config(data=nest(flat))


def test_pin_job_resolves_the_table_and_task_without_changing_the_config(tmp_path, gpt2_tokenizer_path):
    from sparktune.tasks import Task
    from sparktune.train.checkpoints import CheckpointStore
    from sparktune.train.pinned import PinnedJob, ResumeDecision, open_job_run, pin_job

    table = write_tokenized_table(tmp_path / "tok", gpt2_tokenizer_path, task="causal-lm", n_train=4, n_test=2,
                                  max_length=16)
    cfg = _cfg(tmp_path, table)
    before = copy.deepcopy(cfg)
    pinned = open_job_run(pin_job(cfg, 2), cfg, None)

    assert isinstance(pinned, PinnedJob) and pinned.task is Task.CAUSAL_LM and pinned.world_size == 2
    assert (pinned.table.location, pinned.table.version) == (table, 1) and pinned.table.table_id
    assert pinned.table.properties["sparktune.max_length"] == "16"
    assert pinned.resume == ResumeDecision() and pinned.resume.fresh and pinned.run_id == ""
    assert pinned.checkpoint_dir == cfg.checkpoint_dir and pinned.output_dir == cfg.output_dir
    assert cfg == before and cfg.model.task == "auto" and cfg.data.location == "" and cfg.data.version is None
    # TorchDistributor pickles it for the ranks; the job record is its persisted form.
    assert pickle.loads(pickle.dumps(pinned)) == pinned
    assert CheckpointStore(pinned.checkpoint_dir).read_job() == pinned.record()
    bound = pinned.bind(cfg)
    assert (bound.data.location, bound.data.version, bound.model.task) == (table, 1, "auto")
    assert cfg == before
    with pytest.raises(AttributeError):
        pinned.run_id = "x"  # type: ignore[misc]


def test_pin_job_refuses_what_no_rank_could_train(tmp_path, gpt2_tokenizer_path):
    from sparktune.errors import ConfigError, SparktuneError
    from sparktune.train.pinned import pin_job

    table = write_tokenized_table(tmp_path / "tok", gpt2_tokenizer_path, task="instruction", n_train=4, n_test=2,
                                  max_length=16)
    with pytest.raises(ConfigError, match=r"data.max_length: 8 would cut instruction rows"):
        pin_job(_cfg(tmp_path, table, **{"data.max_length": 8}), 2)
    with pytest.raises(SparktuneError, match=r"data.table: 'main.db.tok' is a catalog name, which only Spark"):
        pin_job(_cfg(tmp_path, "main.db.tok"), 2)
    with pytest.raises(SparktuneError, match=r"data.table: no Delta table at"):
        pin_job(_cfg(tmp_path, str(tmp_path / "missing")), 2)
