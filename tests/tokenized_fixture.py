"""A synthetic tokenized Delta table (the columns ``sparktune tokenize`` writes), made with delta-rs.

Fast to build at any size (numpy + pyarrow, no Spark), for the staging and data tests and benches.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from sparktune.tasks import TOKENIZED


def tokenized_arrow(n_train: int, n_test: int = 0, *, seed: int = 0, min_len: int = 1, max_len: int = 64,
                    num_labels: int = 2, vocab: int = 1000) -> pa.Table:
    """Rows ``r0000000``.. with random lengths in [min_len, max_len) and labels in [0, num_labels)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    lengths = rng.integers(min_len, max_len, n).astype(np.int32)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    ids = pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(rng.integers(0, vocab, int(offsets[-1]), dtype=np.int32))
    )
    t = TOKENIZED
    return pa.table({
        t.row_id: pa.array([f"r{i:07d}" for i in range(n)]),
        t.split: pa.array(["train"] * n_train + ["test"] * n_test),
        t.label: pa.array(rng.integers(0, num_labels, n).astype(np.int32)),
        t.input_ids: ids,
        t.n_tokens: pa.array(lengths),
        t.truncated: pa.array(np.zeros(n, dtype=bool)),
    }, schema=t.arrow_schema())


def write_tokenized_table(path: str, n_train: int, n_test: int = 0, **kwargs) -> pa.Table:
    """Write the table to ``path`` as a Delta table (version 0); returns what was written."""
    from deltalake import write_deltalake

    table = tokenized_arrow(n_train, n_test, **kwargs)
    write_deltalake(path, table, mode="overwrite")
    return table
