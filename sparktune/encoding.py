"""Executor-side encoding shared by ``sparktune.tokenize`` and ``sparktune.instruct``: one fast
tokenizer per Python worker, whole batches encoded at once, token lists made into Arrow columns."""

from __future__ import annotations

import os

__all__ = ["encode_batch", "token_lists_to_arrow", "worker_tokenizer"]

# One tokenizer per Python worker process: Spark reuses workers across tasks, so the load
# (a few hundred ms, more for big vocabularies) is paid once, not per batch.
_WORKER_TOKENIZERS: dict = {}


def worker_tokenizer(name: str, max_length: int, gguf_file: str = ""):
    """The worker's tokenizer, truncating at ``max_length`` tokens (0: no truncation)."""
    key = (name, max_length, gguf_file)
    if key not in _WORKER_TOKENIZERS:
        # One Rust thread per Spark task: Spark already runs one task per core.
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sparktune.models import load_tokenizer

        tokenizer = load_tokenizer(name, gguf_file or None)
        backend = tokenizer.backend_tokenizer
        backend.no_padding()
        if max_length:
            backend.enable_truncation(max_length)
        else:
            backend.no_truncation()
        _WORKER_TOKENIZERS[key] = tokenizer
    return _WORKER_TOKENIZERS[key]


def encode_batch(tokenizer, texts, add_special_tokens: bool = True):
    """(ids, truncated) per text, with the truncation the backend tokenizer was set up with."""
    backend = tokenizer.backend_tokenizer
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets, which nothing here reads:
    # the same ids and overflow, ~15% faster for WordPiece (BENCHMARKS.md, issue 12).
    encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    encodings = encode(list(texts), add_special_tokens=add_special_tokens)
    return [e.ids for e in encodings], [bool(e.overflowing) for e in encodings]


def token_lists_to_arrow(ids):
    """(list<int32> array, int32 lengths) built from offsets: no per-row Python objects in Arrow."""
    import itertools

    import numpy as np
    import pyarrow as pa

    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)), pa.array(lengths)
