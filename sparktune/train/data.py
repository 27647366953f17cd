"""Training data from a tokenized Delta table, read per rank with delta-rs (no JVM).

Each rank opens the table at the version the launcher pinned, keeps one split, optionally the
first N rows by ``row_id`` (a stable order across ranks and reruns), and takes its own shard.
Shards are made equal in size, by repeating rows (``pad``) or dropping the tail (``drop``), so
every rank runs the same number of optimizer steps: a rank with one batch fewer would leave the
others waiting forever in DDP's all-reduce.

Batches are padded only to their own longest row, and rows of similar length are batched
together (``LengthGroupedBatchSampler``); ``pad_share`` measures what padding remains.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from sparktune.errors import SparktuneError

__all__ = [
    "TokenizedSplit",
    "read_split",
    "table_info",
    "shard_indices",
    "LengthGroupedBatchSampler",
    "DynamicPaddingCollator",
    "pad_share",
]

REQUIRED_COLUMNS = ("row_id", "split", "input_ids")


@dataclass
class TokenizedSplit:
    """One split's rows, as python lists (small enough: token ids of a fine-tuning set)."""

    row_ids: list
    input_ids: list
    labels: list | None

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, indices) -> "TokenizedSplit":
        return TokenizedSplit(
            [self.row_ids[i] for i in indices],
            [self.input_ids[i] for i in indices],
            None if self.labels is None else [self.labels[i] for i in indices],
        )


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


def table_info(location: str, version: int | None = None) -> dict:
    """``{"version", "properties", "columns"}`` of the table at ``location``."""
    table = _open(location, version)
    return {
        "version": table.version(),
        "properties": dict(table.metadata().configuration or {}),
        "columns": [f.name for f in table.schema().fields],
    }


def read_split(location: str, version: int, split: str, *, task: str, limit: int | None = None,
               max_length: int | None = None) -> TokenizedSplit:
    """Rows of ``split`` at ``version``, ordered by ``row_id``, the first ``limit`` of them.

    Classification keeps labelled rows only (``label >= 0``); causal-LM ignores labels.
    """
    import pyarrow.compute as pc

    table = _open(location, version)
    columns = [f.name for f in table.schema().fields]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if task == "classification" and "label" not in columns:
        missing.append("label")
    if missing:
        raise SparktuneError(
            f"data.table: {location!r} lacks column(s) {missing}; found {columns}. "
            "Point data.table at the output of `sparktune tokenize`"
        )
    wanted = ["row_id", "split", "input_ids"] + (["label"] if task == "classification" else [])
    dataset = table.to_pyarrow_dataset()
    filt = pc.field("split") == split
    if task == "classification":
        filt = filt & (pc.field("label") >= 0)
    arrow = dataset.to_table(columns=wanted, filter=filt)
    # Sorting by row_id gives every rank, and every relaunch, the same rows in the same order,
    # whatever order the table's files come back in.
    arrow = arrow.sort_by([("row_id", "ascending")])
    if limit is not None:
        arrow = arrow.slice(0, limit)
    input_ids = arrow.column("input_ids").to_pylist()
    if max_length is not None:
        input_ids = [ids[:max_length] for ids in input_ids]
    labels = arrow.column("label").to_pylist() if task == "classification" else None
    return TokenizedSplit(arrow.column("row_id").to_pylist(), input_ids, labels)


def shard_indices(n_rows: int, rank: int, world_size: int, uneven: str = "pad") -> list:
    """Indices of rank ``rank``'s rows; the same count on every rank.

    ``pad`` wraps around to the first rows (as torch's DistributedSampler does), ``drop`` drops
    the last ``n_rows % world_size`` rows.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    if n_rows == 0:
        return []
    if uneven == "drop":
        total = (n_rows // world_size) * world_size
        if total == 0:
            raise SparktuneError(
                f"data.uneven: drop leaves no rows ({n_rows} rows for {world_size} processes); "
                "use data.uneven=pad or fewer distributor.num_processes"
            )
        order = list(range(total))
    else:
        total = math.ceil(n_rows / world_size) * world_size
        order = [i % n_rows for i in range(total)]
    return order[rank:total:world_size]


class LengthGroupedBatchSampler:
    """Batches of similar-length rows, in a shuffled order that depends on (seed, epoch).

    Rows are shuffled, cut into mega-batches of ``mega_factor`` batches, each sorted by length
    and cut into batches; the batches are then shuffled. The batch count is
    ``ceil(len / batch_size)`` on every rank with equal shards, so ranks stay in step.
    """

    def __init__(self, lengths, batch_size: int, seed: int = 0, group_by_length: bool = True,
                 mega_factor: int = 50, shuffle: bool = True):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega_factor = mega_factor
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
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            mega = self.batch_size * self.mega_factor
            grouped = []
            for start in range(0, len(order), mega):
                chunk = sorted(order[start:start + mega], key=lambda i: self.lengths[i], reverse=True)
                grouped.extend(chunk)
            order = grouped
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.shuffle and self.group_by_length:
            rng.shuffle(batches)
        yield from batches


class DynamicPaddingCollator:
    """Pads a batch to its longest row (rounded up to ``pad_to_multiple_of``).

    Classification rows carry ``labels`` (an int); causal-LM labels are the input ids with
    padded positions set to -100 so the loss ignores them. Counts of real and padded tokens
    are kept for ``pad_share``.
    """

    def __init__(self, pad_token_id: int, task: str, pad_to_multiple_of: int | None = None,
                 max_length: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.task = task
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length
        self.real_tokens = 0
        self.padded_tokens = 0

    def __call__(self, features):
        import torch

        seqs = [list(f["input_ids"]) for f in features]
        if self.max_length is not None:
            seqs = [s[: self.max_length] for s in seqs]
        width = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        real = int(mask.sum())
        self.real_tokens += real
        self.padded_tokens += ids.numel() - real
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.task == "classification":
            batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        else:
            labels = ids.clone()
            labels[mask == 0] = -100
            batch["labels"] = labels
        return batch

    def take_counts(self) -> tuple[int, int]:
        """(real, padded) tokens since the last call."""
        counts = (self.real_tokens, self.padded_tokens)
        self.real_tokens = self.padded_tokens = 0
        return counts


def pad_share(real_tokens: int, padded_tokens: int) -> float:
    total = real_tokens + padded_tokens
    return padded_tokens / total if total else 0.0


class RowsDataset:
    """A map-style torch dataset over a ``TokenizedSplit``."""

    def __init__(self, split: TokenizedSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i):
        item = {"input_ids": self.split.input_ids[i]}
        if self.split.labels is not None:
            item["labels"] = self.split.labels[i]
        return item
