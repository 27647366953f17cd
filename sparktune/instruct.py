"""Tokenizing a labelled raw table into prompt/answer pairs (``Task.INSTRUCTION``), in Spark executors.

The prompt building itself is ``sparktune.prompts`` (pure, shipped with the model); this is the
``mapInArrow`` side: one ``PromptEncoder`` per Python worker, whole Arrow batches in, rows of
the tokenized table (with ``prompt_tokens``) out. Unlabelled rows (label -1) have no answer and
are dropped before this runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from sparktune.encoding import token_lists_to_arrow, worker_tokenizer
from sparktune.prompts import PromptEncoder, PromptSpec
from sparktune.tasks import TOKENIZED, Task

__all__ = ["answer_lengths_of", "instruction_partition", "instruction_properties", "spec_of"]

_WORKER_ENCODERS: dict = {}


def _worker_encoder(name: str, max_length: int, spec_json: str, gguf_file: str) -> PromptEncoder:
    key = (name, max_length, spec_json, gguf_file)
    if key not in _WORKER_ENCODERS:
        # No backend truncation: the encoder cuts the text, never the template or the answer.
        tokenizer = worker_tokenizer(name, 0, gguf_file)
        _WORKER_ENCODERS[key] = PromptEncoder(tokenizer, PromptSpec.from_json(spec_json), max_length)
    return _WORKER_ENCODERS[key]


def instruction_partition(name: str, max_length: int, spec: PromptSpec, gguf_file: str = ""):
    """The ``mapInArrow`` function: raw (row_id, split, label, text) batches -> instruction rows."""
    spec_json = spec.to_json()

    def tokenize(batches):
        import pyarrow as pa

        encoder = _worker_encoder(name, max_length, spec_json, gguf_file)
        for batch in batches:
            labels = batch.column("label").cast(pa.int32())
            ids, prompt_lens, truncated = encoder.pairs(batch.column("text").to_pylist(), labels.to_pylist())
            input_ids, n_tokens = token_lists_to_arrow(ids)
            yield pa.RecordBatch.from_arrays(
                [batch.column("row_id"), batch.column("split"), labels, input_ids, n_tokens,
                 pa.array(truncated, type=pa.bool_()), pa.array(prompt_lens, type=pa.int32())],
                names=TOKENIZED.columns_for(Task.INSTRUCTION),
            )

    return tokenize


def instruction_properties(tokenizer, spec: PromptSpec, max_length: int) -> dict:
    """Provenance entries (keyed by ``PropertyKey.name``) an instruction table adds: the template,
    the answers and their token ids, so training masks and scorers score the same tokens."""
    encoder = PromptEncoder(tokenizer, spec, max_length)  # raises when max_length leaves no room for text
    return {TOKENIZED.prop_template.name: spec.template,
            TOKENIZED.prop_answers.name: json.dumps(list(spec.answers)),
            TOKENIZED.prop_answer_ids.name: json.dumps(encoder.answer_ids),
            TOKENIZED.prop_labels.name: json.dumps(list(spec.labels))}


def answer_lengths_of(properties: Mapping[str, str]) -> list[int] | None:
    """Tokens the loss covers per class (answer + EOS), from an instruction table's properties."""
    raw = properties.get(TOKENIZED.prop_answer_ids)
    return [len(a) + 1 for a in json.loads(raw)] if raw else None


def spec_of(properties: Mapping[str, str]) -> PromptSpec | None:
    """The prompt an instruction table was built with (None for other tables)."""
    if TOKENIZED.prop_template not in properties:
        return None
    labels = json.loads(properties.get(TOKENIZED.prop_labels) or "[]")
    return PromptSpec(properties[TOKENIZED.prop_template], tuple(json.loads(properties[TOKENIZED.prop_answers])),
                      tuple(labels))
