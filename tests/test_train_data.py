"""A rank's data path without Spark: flat buffers, shard files read by row group, the sampler, resume."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenized_fixture import tokenized_arrow, write_tokenized_table

from sparktune.errors import SparktuneError
from sparktune.train.config import load_train_config
from sparktune.train.data import (
    DynamicPaddingCollator,
    FlatRows,
    LengthGroupedBatchSampler,
    ShardDataset,
    load_rank_data,
    read_shard,
    read_split,
)


def _shard_file(path, table, row_group_size):
    """A shard file as staging writes it: rows in local order, with their ``_local`` position."""
    table = table.append_column("_local", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    pq.write_table(table.select(["_local", "row_id", "label", "input_ids", "n_tokens"]), path,
                   row_group_size=row_group_size)
    return table


def test_read_shard_streams_row_groups_into_memory_mapped_buffers(tmp_path):
    table = _shard_file(tmp_path / "a.parquet", tokenized_arrow(250, seed=1), row_group_size=40)
    more = _shard_file(tmp_path / "b.parquet", tokenized_arrow(30, seed=2), row_group_size=40)
    # The second file continues the first's local positions.
    more = more.set_column(more.schema.get_field_index("_local"), "_local",
                           pa.array(np.arange(250, 280, dtype=np.int64)))
    pq.write_table(more.select(["_local", "row_id", "label", "input_ids", "n_tokens"]), tmp_path / "b.parquet")
    rows = read_shard([tmp_path / "a.parquet", tmp_path / "b.parquet"], cache_dir=str(tmp_path / "cache"),
                      has_labels=True)
    assert isinstance(rows.ids, np.memmap) and rows.ids.dtype == np.int32 and len(rows) == 280
    expected = table.column("input_ids").to_pylist() + more.column("input_ids").to_pylist()
    assert [rows.row(i).tolist() for i in (0, 39, 40, 249, 250, 279)] == [
        expected[i] for i in (0, 39, 40, 249, 250, 279)
    ]
    assert rows.lengths.tolist() == [len(x) for x in expected]
    assert rows.labels.tolist() == table.column("label").to_pylist() + more.column("label").to_pylist()
    again = read_shard([], cache_dir=str(tmp_path / "cache"), has_labels=True)  # reused: files not reread
    assert len(again) == 280

    shuffled = tokenized_arrow(10).append_column("_local", pa.array(np.arange(10, 0, -1, dtype=np.int64)))
    pq.write_table(shuffled, tmp_path / "bad.parquet")
    with pytest.raises(SparktuneError, match="out of order"):
        read_shard([tmp_path / "bad.parquet"], cache_dir=str(tmp_path / "bad"), has_labels=True)
    assert not (tmp_path / "bad").exists()  # no half-written cache left to be trusted


def test_flat_rows_select_and_dataset():
    rows = FlatRows.from_arrow(pa.array([[1, 2, 3], [4], [], [5, 6]], pa.list_(pa.int32())), pa.array([0, 1, 0, 1]))
    picked = rows.select([3, 0, 3])
    assert [picked.row(i).tolist() for i in range(3)] == [[5, 6], [1, 2, 3], [5, 6]]
    assert picked.labels.tolist() == [1, 0, 1] and picked.lengths.tolist() == [2, 3, 2]
    batch = DynamicPaddingCollator(0, "classification")(ShardDataset(picked).__getitems__([0, 1]))
    assert batch["input_ids"].tolist() == [[5, 6, 0], [1, 2, 3]] and batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_sampler_windows_are_bounded_deterministic_and_equal_across_ranks():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, 1003)
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=7, mega_factor=4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 126 and sum(len(b) == 8 for b in batches) == 125
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert list(sampler) == batches  # same seed and epoch, same order: what resume relies on
    sampler.set_epoch(1)
    assert list(sampler) != batches and sorted(i for b in sampler for i in b) == list(range(1003))
    # Grouping within windows of 32 rows keeps padding far below random batching.
    def pad(bs):
        return sum(max(lengths[b]) * len(b) - lengths[b].sum() for b in bs) / lengths.sum()
    plain = list(LengthGroupedBatchSampler(lengths, 8, seed=7, group_by_length=False))
    assert pad(batches) < 0.5 * pad(plain)
    # Another rank (its own lengths, the same shard size and seed) visits the same windows in the
    # same order: without length grouping its batches hold exactly the same local positions.
    other = LengthGroupedBatchSampler(rng.integers(1, 500, 1003), batch_size=8, seed=7, group_by_length=False)
    assert list(other) == plain


def test_resume_skips_to_the_same_sample():
    """What Trainer does on resume: accelerate's skip_first_batches, then set_epoch via batch_sampler."""
    from accelerate import skip_first_batches
    from torch.utils.data import DataLoader

    rows = FlatRows.from_arrow(tokenized_arrow(100, seed=3).column("input_ids"))
    sampler = LengthGroupedBatchSampler(rows.lengths, batch_size=4, seed=11)

    def loader():
        return DataLoader(ShardDataset(rows), batch_sampler=sampler, collate_fn=DynamicPaddingCollator(0, "causal-lm"))

    sampler.set_epoch(2)
    full = [b["input_ids"] for b in loader()]
    sampler.set_epoch(0)  # a fresh process starts at epoch 0 until Trainer sets it
    skipped = skip_first_batches(loader(), 9)
    skipped.batch_sampler.batch_sampler.set_epoch(2)  # Trainer._run_epoch reaches the sampler this way
    rest = [b["input_ids"] for b in skipped]
    assert len(rest) == len(full) - 9
    assert all((a == b).all() for a, b in zip(rest, full[9:]))


def _cfg(location, *overrides):
    return load_train_config(None, ["output_dir=/tmp/unused", "model.name=m", f"data.location={location}",
                                    "data.table=t", "data.version=0", *overrides])


def test_load_rank_data_without_a_stage_reads_the_table(tmp_path):
    written = write_tokenized_table(str(tmp_path / "tok"), 21, 5, seed=4)
    cfg = _cfg(tmp_path / "tok", "data.train_limit=11", "data.max_length=8")
    ranks = [load_rank_data(cfg, r, 2, "classification") for r in range(2)]
    assert [len(r.train) for r in ranks] == [6, 6] and not ranks[0].staged and ranks[0].train_rows == 11
    first = written.slice(0, 11).column("input_ids").to_pylist()
    assert ranks[0].train.rows.row(0).tolist() == first[0][:8] and ranks[1].train.rows.row(5).tolist() == first[0][:8]
    assert ranks[0].lengths.max() <= 8 and len(ranks[0].eval) == 5
    assert len(read_split(str(tmp_path / "tok"), 0, "train", task="causal-lm")) == 21


def test_labels_outside_num_labels_are_refused(tmp_path):
    write_tokenized_table(str(tmp_path / "tok"), 30, seed=5, num_labels=3)
    with pytest.raises(SparktuneError, match=r"model.num_labels: split 'train' .* labels from 0 to 2"):
        load_rank_data(_cfg(tmp_path / "tok", "data.eval_split="), 0, 1, "classification")
    assert load_rank_data(_cfg(tmp_path / "tok", "model.num_labels=3", "data.eval_split="), 0, 1,
                          "classification").eval is None
