"""Training data for one rank: flat token buffers, a length-grouping batch sampler, a padding collator.

Rows live in flat buffers (``FlatRows``): one int32 array of every token id, int64 offsets
where each row starts, int32 labels. Never Python lists of ints: those cost ~36 bytes a token.

Two ways in:

* ``read_shard``: the rank's own shard, staged by Spark (``sparktune.staging``). Read a few
  thousand rows at a time into flat files in a local cache folder, then memory-mapped, so a
  rank's memory does not grow with the corpus (only the pages its batches touch are resident).
* ``read_split``: the whole split read with delta-rs (no JVM), for runs without a stage (plain
  torchrun, tests); every rank then keeps its share (``shard_indices``). Memory grows with the
  split, so ``sparktune train`` stages instead.

``load_rank_data`` picks the stage when one exists for the job and falls back to ``read_split``.

Shards are equal in size, by repeating rows (``pad``) or dropping the tail (``drop``), so every
rank runs the same number of optimizer steps: a rank with one batch fewer would leave the others
waiting forever in DDP's all-reduce. Batches are padded only to their own longest row, and rows
of similar length are batched together within a bounded window (``LengthGroupedBatchSampler``);
``pad_share`` measures what padding remains.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparktune.env import env_value
from sparktune.errors import SparktuneError
from sparktune.tasks import TOKENIZED, Task

__all__ = [
    "DynamicPaddingCollator",
    "FlatRows",
    "LengthGroupedBatchSampler",
    "RankData",
    "ShardDataset",
    "load_rank_data",
    "pad_share",
    "read_shard",
    "read_split",
    "shard_indices",
    "stage_key_for",
]

class _RowView:
    """``rows.input_ids[i]``: row i's ids as a numpy view (sequence-like, for older callers)."""

    def __init__(self, rows: FlatRows):
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        return self._rows.row(i)

    def __iter__(self):
        return (self._rows.row(i) for i in range(len(self._rows)))


@dataclass
class FlatRows:
    """Rows of token ids in flat buffers: row i is ``ids[offsets[i]:offsets[i+1]]``."""

    offsets: np.ndarray
    """int64, one more than the rows."""
    ids: np.ndarray
    """int32 token ids of every row, back to back (may be a read-only memory map)."""
    labels: np.ndarray | None = None
    """int32 label per row (classification), else None."""
    row_ids: Any = None
    """The rows' ``row_id`` values (an Arrow string array) when read from the table, else None."""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)

    @property
    def input_ids(self) -> _RowView:
        return _RowView(self)

    def select(self, indices) -> FlatRows:
        """A new in-memory FlatRows of the rows at ``indices`` (in that order, repeats allowed)."""
        idx = np.asarray(indices, dtype=np.int64)
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        lengths = ends - starts
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        for k, (a, b) in enumerate(zip(starts, ends)):
            ids[offsets[k]:offsets[k + 1]] = self.ids[a:b]
        labels = None if self.labels is None else np.asarray(self.labels)[idx]
        row_ids = None if self.row_ids is None else self.row_ids.take(idx)
        return FlatRows(offsets, ids, labels, row_ids)

    @classmethod
    def from_arrow(cls, input_ids, labels=None, row_ids=None) -> FlatRows:
        """From an Arrow list<int> array (or chunked array), optional label and row_id columns."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if isinstance(input_ids, pa.ChunkedArray):
            input_ids = input_ids.combine_chunks()
        lengths = pc.list_value_length(input_ids).fill_null(0).to_numpy(zero_copy_only=False)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.asarray(input_ids.flatten().to_numpy(zero_copy_only=False), dtype=np.int32)
        labs = None if labels is None else np.asarray(labels.to_numpy(zero_copy_only=False), dtype=np.int32)
        if row_ids is not None and isinstance(row_ids, pa.ChunkedArray):
            row_ids = row_ids.combine_chunks()
        return cls(offsets, ids, labs, row_ids)



def _open(location: str, version: int | None):
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(location, version=version)
    except TableNotFoundError:
        raise SparktuneError(
            f"data.table: no Delta table at {location!r}; run `sparktune tokenize` first or check the path"
        ) from None
    except Exception as exc:  # delta-rs raises plain exceptions for a missing version
        if version is not None and "version" in str(exc).lower():
            raise SparktuneError(
                f"data.version: table {location!r} has no version {version} ({exc}); "
                "leave data.version empty for the latest"
            ) from None
        raise


def read_split(location: str, version: int, split: str, *, task: str | Task, limit: int | None = None,
               max_length: int | None = None) -> FlatRows:
    """Rows of ``split`` at ``version``, ordered by ``row_id``, the first ``limit`` of them.

    Classification keeps labelled rows only (``label >= 0``); causal-LM ignores labels.
    """
    import pyarrow.compute as pc

    task = Task.parse(task, "model.task")
    t = TOKENIZED
    table = _open(location, version)
    columns = [f.name for f in table.schema().fields]
    missing = [c for c in t.required_columns(task) if c not in columns]
    if missing:
        raise SparktuneError(
            f"data.table: {location!r} lacks column(s) {missing}; found {columns}. "
            "Point data.table at the output of `sparktune tokenize`"
        )
    wanted = [t.row_id, t.input_ids] + ([t.label] if task.has_labels else [])
    filt = pc.field(t.split) == split
    if task.has_labels:
        filt = filt & (pc.field(t.label) >= 0)
    arrow = table.to_pyarrow_dataset().to_table(columns=wanted, filter=filt)
    # Sorting by row_id gives every rank, and every relaunch, the same rows in the same order,
    # whatever order the table's files come back in.
    arrow = arrow.sort_by([(t.row_id, "ascending")])
    if limit is not None:
        arrow = arrow.slice(0, limit)
    ids = arrow.column(t.input_ids).combine_chunks()
    if max_length is not None:
        ids = pc.list_slice(ids, 0, max_length)
    return FlatRows.from_arrow(ids, arrow.column(t.label) if task.has_labels else None, arrow.column(t.row_id))


def shard_indices(n_rows: int, rank: int, world_size: int, uneven: str = "pad") -> np.ndarray:
    """Indices of rank ``rank``'s rows; the same count on every rank.

    ``pad`` wraps around to the first rows (as torch's DistributedSampler does), ``drop`` drops
    the last ``n_rows % world_size`` rows.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    if n_rows == 0:
        return np.zeros(0, dtype=np.int64)
    if uneven == "drop":
        total = (n_rows // world_size) * world_size
        if total == 0:
            raise SparktuneError(
                f"data.uneven: drop leaves no rows ({n_rows} rows for {world_size} processes); "
                "use data.uneven=pad or fewer distributor.num_processes"
            )
    else:
        total = math.ceil(n_rows / world_size) * world_size
    return np.arange(rank, total, world_size, dtype=np.int64) % n_rows


_FLAT_DONE = "flat.json"
_READ_BATCH_ROWS = 4096


def read_shard(paths, *, cache_dir: str, has_labels: bool) -> FlatRows:
    """A rank's staged shard (Parquet files, in order) as memory-mapped flat buffers.

    The files are streamed a few thousand rows at a time into ``cache_dir`` (a local folder; reused
    when complete), so converting never holds more than a few thousand rows.
    """
    done = os.path.join(cache_dir, _FLAT_DONE)
    if not os.path.exists(done):
        _flatten_shard([str(p) for p in paths], cache_dir, has_labels)
    with open(done, encoding="utf-8") as handle:
        counts = json.load(handle)
    rows, tokens = int(counts["rows"]), int(counts["tokens"])
    offsets = np.fromfile(os.path.join(cache_dir, "offsets.i64"), dtype=np.int64)
    ids = (np.memmap(os.path.join(cache_dir, "ids.i32"), dtype=np.int32, mode="r", shape=(tokens,))
           if tokens else np.zeros(0, dtype=np.int32))
    labels = np.fromfile(os.path.join(cache_dir, "labels.i32"), dtype=np.int32) if has_labels else None
    if len(offsets) != rows + 1:
        raise SparktuneError(f"staging: flat cache {cache_dir} is damaged (offsets); delete it and rerun")
    return FlatRows(offsets, ids, labels)


def _flatten_shard(paths: list, cache_dir: str, has_labels: bool) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = TOKENIZED
    parent = os.path.dirname(os.path.abspath(cache_dir))
    os.makedirs(parent, exist_ok=True)
    scratch = os.path.join(parent, f".tmp-{os.path.basename(cache_dir)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(scratch)
    rows = tokens = 0
    columns = [t.input_ids, "_local"] + ([t.label] if has_labels else [])
    try:
        with open(os.path.join(scratch, "ids.i32"), "wb") as f_ids, \
                open(os.path.join(scratch, "offsets.i64"), "wb") as f_off, \
                open(os.path.join(scratch, "labels.i32"), "wb") as f_lab:
            np.zeros(1, dtype=np.int64).tofile(f_off)
            for path in paths:
                # A few thousand rows at a time, streamed through a small read buffer: pre-buffering
                # (pyarrow's default) caches the file's column chunks as it goes, so memory grew with
                # the shard (+290 MB over a 1M-row shard, measured); this stays flat.
                parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
                for batch in parquet.iter_batches(batch_size=_READ_BATCH_ROWS, columns=columns, use_threads=False):
                    local = batch.column("_local").to_numpy()
                    if len(local) and (local[0] != rows or local[-1] != rows + len(local) - 1):
                        raise SparktuneError(f"staging: shard file {path} is out of order; delete the stage and rerun")
                    ids = batch.column(t.input_ids)
                    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
                    np.asarray(ids.flatten().to_numpy(zero_copy_only=False), dtype=np.int32).tofile(f_ids)
                    (np.cumsum(lengths) + tokens).tofile(f_off)
                    if has_labels:
                        np.asarray(batch.column(t.label).to_numpy(), dtype=np.int32).tofile(f_lab)
                    rows += len(lengths)
                    tokens += int(lengths.sum())
                    del ids
        with open(os.path.join(scratch, _FLAT_DONE), "w", encoding="utf-8") as handle:
            json.dump({"rows": rows, "tokens": tokens, "files": paths}, handle)
        try:
            os.rename(scratch, cache_dir)
        except OSError:
            if not os.path.exists(os.path.join(cache_dir, _FLAT_DONE)):  # a stale half-copy: replace it
                shutil.rmtree(cache_dir, ignore_errors=True)
                os.rename(scratch, cache_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class LengthGroupedBatchSampler:
    """Batches of similar-length rows, in an order that depends only on (seed, epoch, row count).

    Memory is bounded by the window, not the shard: each epoch rotates the row positions by a
    random shift, cuts them into windows of ``batch_size * mega_factor`` rows, visits the windows
    in random order, and within a window shuffles, sorts by length (longest first) and cuts
    batches, whose order is shuffled. Every batch is full but the last, so there are
    ``ceil(len / batch_size)`` batches: ranks with equal shards run equal steps, and since the
    permutation depends only on the seed, epoch and row count, ranks whose k-th rows have
    similar lengths (as staging deals them) form batches of similar width at the same step.
    Deterministic, so a resumed job that skips the batches it already saw continues at the
    same sample.
    """

    def __init__(self, lengths, batch_size: int, seed: int = 0, group_by_length: bool = True,
                 mega_factor: int = 50, shuffle: bool = True):
        self.lengths = np.asarray(lengths)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.group_by_length = group_by_length
        self.mega_factor = max(1, int(mega_factor))
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def batch_sampler(self):
        # Trainer calls set_epoch on ``loader.batch_sampler.batch_sampler`` (accelerate's shard
        # wrapper, or SkipBatchSampler on resume); pointing at ourselves lets it reach us too.
        return self

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        n = len(self.lengths)
        if n == 0:
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        window = self.batch_size * self.mega_factor
        n_windows = math.ceil(n / window)
        shift = int(rng.integers(n)) if self.shuffle else 0
        order = rng.permutation(n_windows) if self.shuffle else np.arange(n_windows)
        for w in order:
            start = int(w) * window
            rows = (np.arange(start, min(start + window, n), dtype=np.int64) + shift) % n
            if self.shuffle:
                rows = rows[rng.permutation(len(rows))]
            if self.group_by_length:
                rows = rows[np.argsort(-self.lengths[rows], kind="stable")]
            batches = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            for batch in batches:
                yield batch.tolist()


class DynamicPaddingCollator:
    """Pads a batch to its longest row (rounded up to ``pad_to_multiple_of``).

    Classification rows carry ``labels`` (an int); causal-LM labels are the input ids with
    padded positions set to -100 so the loss ignores them. Instruction rows carry their class
    id as ``labels``; with ``answer_lengths`` (tokens of each class's answer + EOS, from the
    table's properties) only the answer positions keep their ids (``sparktune.prompts``).
    Counts of real and padded tokens are kept for ``pad_share``.
    """

    def __init__(self, pad_token_id: int, task: str | Task, pad_to_multiple_of: int | None = None,
                 max_length: int | None = None, answer_lengths: list[int] | None = None):
        self.pad_token_id = int(pad_token_id)
        self.task = Task.parse(task, "model.task")
        if self.task is Task.INSTRUCTION and not answer_lengths:
            raise SparktuneError("data.table: an instruction table must record its answers' token ids "
                                 "(property sparktune.answer_ids); re-run `sparktune tokenize --task instruction`")
        self.answer_lengths = answer_lengths
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length
        self.real_tokens = 0
        self.padded_tokens = 0

    def __call__(self, features):
        import torch

        seqs = [np.asarray(f["input_ids"]) for f in features]
        if self.max_length is not None:
            seqs = [s[: self.max_length] for s in seqs]
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        width = int(lengths.max()) if len(seqs) else 0
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = np.full((len(seqs), width), self.pad_token_id, dtype=np.int64)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = seq
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        real = int(lengths.sum())
        self.real_tokens += real
        self.padded_tokens += ids.size - real
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if self.task is Task.CLASSIFICATION:
            batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        elif self.task is Task.INSTRUCTION:
            from sparktune.prompts import answer_only_labels, prompt_lengths

            classes = [int(f["labels"]) for f in features]
            starts = prompt_lengths(lengths, classes, self.answer_lengths)
            batch["labels"] = torch.from_numpy(answer_only_labels(ids, lengths, starts).astype(np.int64))
        else:
            labels = ids.copy()
            labels[mask == 0] = -100
            batch["labels"] = torch.from_numpy(labels)
        return batch

    def take_counts(self) -> tuple[int, int]:
        """(real, padded) tokens since the last call."""
        counts = (self.real_tokens, self.padded_tokens)
        self.real_tokens = self.padded_tokens = 0
        return counts


def pad_share(real_tokens: int, padded_tokens: int) -> float:
    total = real_tokens + padded_tokens
    return padded_tokens / total if total else 0.0


class ShardDataset:
    """A map-style torch dataset over ``FlatRows``: items are numpy views, no copies."""

    def __init__(self, rows: FlatRows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        item: dict[str, Any] = {"input_ids": self.rows.row(int(i))}
        if self.rows.labels is not None:
            item["labels"] = int(self.rows.labels[i])
        return item

    def __getitems__(self, indices):
        # torch's DataLoader fetches a whole batch through this when it exists.
        return [self[i] for i in indices]



@dataclass
class RankData:
    """What one rank trains and evaluates on."""

    train: ShardDataset
    eval: ShardDataset | None
    lengths: np.ndarray
    """Token count of each of this rank's training rows (for the batch sampler)."""
    train_rows: int
    """Training rows selected from the table (all ranks, before padding or dropping)."""
    rows_per_rank: int
    staged: bool
    """True when read from a Spark stage, False when read from the table (``read_split``)."""


def stage_key_for(cfg, task: Task, split: str, world_size: int, table_id_: str):
    """The ``StageKey`` the driver stages ``split`` under for this job (train: world size, eval: 1)."""
    from sparktune import __version__
    from sparktune.staging import DEFAULT_WINDOW_ROWS, StageKey

    is_train = split == cfg.data.train_split
    return StageKey(table_id=table_id_, version=int(cfg.data.version), split=split, task=task.value,
                    limit=cfg.data.train_limit if is_train else cfg.data.eval_limit,
                    max_length=cfg.data.max_length, world_size=world_size if is_train else 1,
                    seed=int(cfg.train.seed), uneven=cfg.data.uneven if is_train else "pad",
                    window_rows=DEFAULT_WINDOW_ROWS, sparktune_version=__version__)


def _default_cache_dir() -> str:
    return env_value("SPARKTUNE_SHARD_CACHE") or os.path.join(tempfile.gettempdir(), "sparktune-shards")


def _label_range(labels: np.ndarray | None) -> tuple[int | None, int | None]:
    if labels is None or not len(labels):
        return None, None
    return int(labels.min()), int(labels.max())


def load_rank_data(cfg, rank: int, world_size: int, task: Task | str, *, staging_dir: str | None = None,
                   cache_dir: str | None = None, table_id: str | None = None) -> RankData:
    """This rank's training rows (its shard) and the evaluation rows, as flat buffers.

    ``cfg``: the job's TrainConfig with ``data.location`` and ``data.version`` pinned. With
    ``staging_dir`` holding a stage of this job (``sparktune.staging.stage_job_data``), reads
    only this rank's shard, memory-mapped from ``cache_dir`` (default ``$SPARKTUNE_SHARD_CACHE``
    or the temp dir); otherwise reads the split from the table and keeps this rank's share.
    Labels outside ``[0, model.num_labels)`` raise SparktuneError (classification). ``table_id``:
    the pinned table's Delta id (the stage's key), else read from the Delta log here.
    """
    from sparktune.staging import StagedData, check_labels, check_stage_labels, find_staged
    from sparktune.tables import read_snapshot

    task = Task.parse(task, "model.task")
    d = cfg.data
    num_labels = cfg.model.num_labels if task.has_labels else None
    where = f"table {d.table or d.location!r} v{d.version}"
    cache_root = cache_dir or _default_cache_dir()

    if staging_dir and not table_id:
        table_id = read_snapshot(None, d.location, d.version, "data.table").table_id

    def staged(split: str, world: int) -> StagedData | None:
        if not staging_dir:
            return None
        return find_staged(staging_dir, stage_key_for(cfg, task, split, world, table_id or ""))

    def from_stage(stage: StagedData, shard: int) -> FlatRows:
        check_stage_labels(stage.manifest, num_labels, f"split {stage.manifest.key.split!r} of {where}")
        folder = os.path.join(cache_root, f"{stage.manifest.digest}-rank{shard}")
        return read_shard(stage.shard_paths(shard), cache_dir=folder, has_labels=task.has_labels)

    train_stage = staged(d.train_split, world_size)
    if train_stage is not None:
        shard = from_stage(train_stage, rank)
        train_rows, rows_per_rank = train_stage.manifest.rows, train_stage.manifest.rows_per_rank
    else:
        if staging_dir:
            logging.getLogger("sparktune.train").warning(
                "sparktune train: no stage of this job under %s (launched without `sparktune train`?); every rank "
                "reads the whole split %r, so memory grows with it", staging_dir, d.train_split)
        rows = read_split(d.location, d.version, d.train_split, task=task, limit=d.train_limit,
                          max_length=d.max_length)
        if len(rows) == 0:
            raise SparktuneError(
                f"data.train_split: {where} has no {'labelled ' if task.has_labels else ''}rows with "
                f"split={d.train_split!r}; check data.train_split or re-run `sparktune tokenize`"
            )
        if num_labels is not None:
            check_labels(*_label_range(rows.labels), num_labels, f"split {d.train_split!r} of {where}")
        shard = rows.select(shard_indices(len(rows), rank, world_size, d.uneven))
        train_rows, rows_per_rank = len(rows), len(shard)
    eval_set = None
    if d.eval_split:
        eval_stage = staged(d.eval_split, 1)
        if eval_stage is not None:
            eval_rows = from_stage(eval_stage, 0)
        else:
            eval_rows = read_split(d.location, d.version, d.eval_split, task=task, limit=d.eval_limit,
                                   max_length=d.max_length)
            if num_labels is not None:
                check_labels(*_label_range(eval_rows.labels), num_labels, f"split {d.eval_split!r} of {where}")
        eval_set = ShardDataset(eval_rows) if len(eval_rows) else None
    return RankData(train=ShardDataset(shard), eval=eval_set, lengths=shard.lengths, train_rows=train_rows,
                    rows_per_rank=rows_per_rank, staged=train_stage is not None)
