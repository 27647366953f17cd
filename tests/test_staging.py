"""Spark stages training data: equal, length-bucketed shards per rank, cached, validated, read by ranks."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from tokenized_fixture import write_tokenized_table

from sparktune.errors import SparktuneError
from sparktune.staging import MANIFEST, find_staged, stage_job_data, stage_training_data
from sparktune.train.config import load_train_config
from sparktune.train.data import load_rank_data


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("staging") / "tokenized")
    table = write_tokenized_table(path, 601, 40, seed=9, max_len=200)
    return path, table


def _shard(stage, rank):
    return pq.read_table(stage.shard_paths(rank)).to_pydict()


def test_job_stage_deals_equal_length_bucketed_shards_and_ranks_read_only_theirs(spark, tokenized, tmp_path):
    path, table = tokenized
    cfg = load_train_config(None, ["output_dir=" + str(tmp_path / "out"), "model.name=m", "data.table=" + path,
                                   "data.location=" + path, "data.version=0", "distributor.num_processes=2"])
    stages = stage_job_data(spark, cfg, "classification")
    stage = stages["train"]
    assert stage.directory.startswith(str(tmp_path / "out" / "staging")) and not stage.reused
    assert (stage.manifest.rows, stage.manifest.rows_per_rank) == (601, 301)
    shards = [_shard(stage, r) for r in range(2)]
    assert [len(s["row_id"]) for s in shards] == [301, 301]  # equal rows, equal steps
    assert [s["_local"] for s in shards] == [list(range(301))] * 2  # each file in sample order
    train_ids = table.filter(table.column("split").to_numpy(zero_copy_only=False) == "train").column("row_id")
    dealt = shards[0]["row_id"] + shards[1]["row_id"]
    assert set(dealt) == set(train_ids.to_pylist()) and len(dealt) == 602  # one row repeated (uneven=pad)
    # Neighbours in a length-sorted window go to different ranks: the k-th rows match in length.
    gap = np.abs(np.array(shards[0]["n_tokens"]) - np.array(shards[1]["n_tokens"]))
    assert np.median(gap) <= 2, gap

    # A rank reads its own shard from the stage (same key computed without Spark).
    rank1 = load_rank_data(cfg, 1, 2, "classification", cache_dir=str(tmp_path / "cache"),
                           staging_dir=str(tmp_path / "out" / "staging"))
    assert rank1.staged and rank1.rows_per_rank == 301 and rank1.train_rows == 601
    assert [rank1.train.rows.row(i).tolist() for i in (0, 300)] == [shards[1]["input_ids"][i] for i in (0, 300)]
    assert rank1.train.rows.labels.tolist() == shards[1]["label"] and rank1.lengths.tolist() == shards[1]["n_tokens"]
    assert len(rank1.eval) == stages["test"].manifest.rows == 40

    again = stage_training_data(spark, path, 0, "train", 2, seed=cfg.train.seed,
                                staging_dir=os.path.dirname(stage.directory), num_labels=2)
    assert again.reused and again.directory == stage.directory
    # A stage whose manifest is missing (a crash mid-write) is never used.
    os.remove(os.path.join(stage.directory, MANIFEST))
    assert find_staged(os.path.dirname(stage.directory), stage.manifest.key) is None


def test_limit_drop_seed_and_bad_labels(spark, tokenized, tmp_path):
    path, table = tokenized
    folder = str(tmp_path / "st")
    stage = stage_training_data(spark, path, 0, "train", 2, seed=5, limit=101, max_length=16, uneven="drop",
                                staging_dir=folder, num_labels=2)
    assert (stage.manifest.rows, stage.manifest.rows_per_rank) == (101, 50)
    shards = [_shard(stage, r) for r in range(2)]
    dealt = shards[0]["row_id"] + shards[1]["row_id"]
    first = sorted(table.filter(table.column("split").to_numpy(zero_copy_only=False) == "train")
                   .column("row_id").to_pylist())[:101]
    assert len(set(dealt)) == 100 and set(dealt) <= set(first)  # data.train_limit: first rows by row_id
    assert max(max(s["n_tokens"]) for s in shards) <= 16
    assert stage.manifest.max_tokens <= 16 and len(os.listdir(folder)) == 1
    # Labels 0..1 but the model has one class: refused before any shard is written.
    with pytest.raises(SparktuneError, match=r"model.num_labels: split 'train' .* labels from 0 to 1, but "
                                             r"model.num_labels=1"):
        stage_training_data(spark, path, 0, "train", 2, seed=6, staging_dir=folder, num_labels=1)
    assert len(os.listdir(folder)) == 1
    # And when the stage exists already, its manifest's label range is checked again.
    with pytest.raises(SparktuneError, match="model.num_labels"):
        stage_training_data(spark, path, 0, "train", 2, seed=5, limit=101, max_length=16, uneven="drop",
                            staging_dir=folder, num_labels=1)
