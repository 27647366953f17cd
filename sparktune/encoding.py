"""Executor-side encoding shared by ``sparktune.tokenize`` and ``sparktune.instruct``: one fast
tokenizer per Python worker, whole batches encoded at once, token lists made into Arrow columns."""

from __future__ import annotations

import os

__all__ = ["encode_batch", "prefix_cut_safe", "token_lists_to_arrow", "worker_tokenizer"]

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
    """(ids, truncated) per text, with the truncation the backend tokenizer was set up with.

    A text far longer than the truncation needs is first encoded from a prefix cut at a word's end
    (``_PrefixCut``): the same ids and flag as the whole text, without tokenizing what truncation drops.
    """
    backend = tokenizer.backend_tokenizer
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets, which nothing here reads:
    # the same ids and overflow, ~15% faster for WordPiece (BENCHMARKS.md, issue 12).
    encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    texts = list(texts)
    cut = _prefix_cut(backend)
    if cut is None:
        encodings = encode(texts, add_special_tokens=add_special_tokens)
    else:
        encodings = cut.encode(encode, texts, add_special_tokens)
    return [e.ids for e in encodings], [bool(e.overflowing) for e in encodings]


# Pipeline parts whose output for a text cut at "letter or digit | ASCII space" is the output for
# the whole text up to that point: normalizers that map characters one by one (composition cannot
# cross the space, a starter), pre-tokenizers that split at that space, models that encode each
# pre-token alone, post-processors that only add special tokens. Anything else: no cut.
_CUT_SAFE: dict[str, set] = {
    "normalizer": {None, "BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents", "Strip",
                   "Prepend"},
    "pre_tokenizer": {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "Punctuation", "Digits", "ByteLevel",
                      "Metaspace"},
    "model": {"WordPiece", "BPE", "WordLevel", "Unigram"},
    "post_processor": {None, "TemplateProcessing", "BertProcessing", "RobertaProcessing", "ByteLevel"},
}
_SPLIT_AT_SPACE = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "ByteLevel", "Metaspace"}


def _parts(node: dict | None) -> list:
    """The components of a pipeline step, a ``Sequence``'s members flattened."""
    if node is None:
        return [None]
    members = node.get("normalizers") or node.get("pretokenizers") or node.get("processors")
    if node.get("type") == "Sequence" and members is not None:
        return [part for member in members for part in _parts(member)]
    return [node]


def prefix_cut_safe(config: dict) -> bool:
    """Whether a tokenizer (its ``to_str()`` JSON) encodes a text cut after a letter or digit followed by
    an ASCII space into the leading tokens of the whole text's encoding, so truncation may encode a prefix."""
    for step in ("normalizer", "pre_tokenizer", "post_processor"):
        parts = _parts(config.get(step))
        # Punctuation and Digits alone leave the space inside a pre-token: one of these must split there.
        if step == "pre_tokenizer" and not any(p and p.get("type") in _SPLIT_AT_SPACE for p in parts):
            return False
        for part in parts:
            kind = None if part is None else part.get("type")
            if kind not in _CUT_SAFE[step]:
                return False
            # ByteLevel without its regex, Metaspace without splitting: one pre-token spans the cut.
            if part is not None and (part.get("use_regex") is False or part.get("split") is False):
                return False
    model = config.get("model") or {}
    if model.get("type") not in _CUT_SAFE["model"] or model.get("dropout"):
        return False
    # An added token with a space in it could match across the cut.
    return not any(any(c.isspace() for c in token.get("content", " ")) for token in config.get("added_tokens") or [])


class _PrefixCut:
    """Encode long texts from a prefix when truncation keeps only their first tokens.

    A text over ``ratio`` characters per kept token is cut at the first word end after that many
    characters (a letter or digit followed by an ASCII space: a split point for every pipeline
    ``prefix_cut_safe`` admits). If the prefix's encoding overflows, the whole text's tokens start
    with the prefix's, so its truncated ids and overflow flag are the whole text's; if not (a text
    of unusually long tokens), the whole text is encoded again. The output never depends on
    ``ratio``, only the speed: ratio 5 left ~9% of IMDB's characters untokenized (MiniLM and GPT-2,
    ~4.3 characters per token) with under 1% of cut texts encoded again; it grows when more than
    5% are (corpora of longer tokens), so a miss cannot cost much.
    """

    def __init__(self, backend, ratio: float = 5.0):
        self.backend = backend
        self.ratio = ratio
        self.cuts = 0
        self.misses = 0

    def cut_at(self, text, max_length: int) -> int:
        """Where to cut ``text`` (its length: no cut)."""
        if not isinstance(text, str):
            return 0  # left to the tokenizer, which reports it as before
        start = int(max_length * self.ratio)
        end = len(text)
        if end <= start:
            return end
        at = text.find(" ", start)
        while at != -1 and not text[at - 1].isalnum():
            at = text.find(" ", at + 1)
        return end if at == -1 else at

    def encode(self, encode, texts: list, add_special_tokens: bool):
        # truncation is read per call: whoever holds the tokenizer may change it.
        truncation = self.backend.truncation
        if not truncation or truncation.get("direction", "right") != "right":
            return encode(texts, add_special_tokens=add_special_tokens)
        ends = [self.cut_at(text, truncation["max_length"]) for text in texts]
        cut = [i for i, (text, end) in enumerate(zip(texts, ends)) if isinstance(text, str) and end < len(text)]
        if not cut:
            return encode(texts, add_special_tokens=add_special_tokens)
        inputs = list(texts)
        for i in cut:
            inputs[i] = texts[i][: ends[i]]
        encodings = encode(inputs, add_special_tokens=add_special_tokens)
        missed = [i for i in cut if not encodings[i].overflowing]
        if missed:
            for i, encoding in zip(missed, encode([texts[i] for i in missed], add_special_tokens=add_special_tokens)):
                encodings[i] = encoding
        self.cuts += len(cut)
        self.misses += len(missed)
        if self.cuts >= 200 and self.misses > 0.05 * self.cuts:
            self.ratio, self.cuts, self.misses = self.ratio * 1.5, 0, 0
        return encodings


# backend tokenizer's id -> (the backend, its _PrefixCut or None); the backend is kept so its id is not reused.
_PREFIX_CUTS: dict = {}


def _prefix_cut(backend):
    entry = _PREFIX_CUTS.get(id(backend))
    if entry is None or entry[0] is not backend:
        import json

        cut = _PrefixCut(backend) if prefix_cut_safe(json.loads(backend.to_str())) else None
        entry = _PREFIX_CUTS[id(backend)] = (backend, cut)
    return entry[1]


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
