"""Checks that a tokenized table fits the model a job trains, before (and when) it runs.

``check_table_matches_model`` is pure (table properties + config): the pipeline calls it
before any stage runs, the launcher before it launches, ranks at setup. ``check_rows_fit_model``
needs the rows and the built model, so only a rank can run it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from sparktune.tasks import TOKENIZED, Task
from sparktune.train.config import TrainConfig

__all__ = ["check_table_matches_model", "check_rows_fit_model"]

_POSITION_KEYS = ("max_position_embeddings", "n_positions")


def _same_source(a: str, b: str) -> bool:
    """Two tokenizer/model sources name the same thing (same string, or the same folder)."""
    if a == b:
        return True
    from sparktune.models import resolve_pretrained

    try:
        pa, pb = resolve_pretrained(a), resolve_pretrained(b)
    except Exception:
        return False
    if os.path.isdir(pa) and os.path.isdir(pb):
        return os.path.realpath(pa) == os.path.realpath(pb)
    return pa == pb


def check_table_matches_model(table_properties: Mapping[str, str], cfg: TrainConfig, *,
                              model_max_positions: int | None = None) -> list[str]:
    """Problems (config key first) where the table's tokenizer, max length or task disagree with the model.

    ``table_properties``: the tokenized table's Delta properties (``sparktune.vocab``,
    ``sparktune.max_length``, ``sparktune.task``); ``model_max_positions``: the longest
    sequence the model accepts, when known (else read from ``model.config_overrides``).
    """
    props = table_properties or {}
    problems = TOKENIZED.legacy_problems(props, cfg.data.table or cfg.data.location)
    if problems:  # read with the old keys, every check below would be wrong
        return problems
    table_task_raw = props.get(TOKENIZED.prop_task)
    table_task = None
    if table_task_raw:
        try:
            table_task = Task.parse(table_task_raw, TOKENIZED.prop_task)
        except Exception:
            problems.append(f"data.table: property {TOKENIZED.prop_task}={table_task_raw!r} is not a task "
                            f"({', '.join(Task.choices())}); re-run `sparktune tokenize`")
    if cfg.model.task == "auto":
        if table_task is None and not table_task_raw:
            problems.append(f"model.task: is auto and the table has no {TOKENIZED.prop_task} property; set "
                            f"model.task={Task.CLASSIFICATION.value} or model.task={Task.CAUSAL_LM.value}")
    elif table_task is not None and Task.parse(cfg.model.task, "model.task") is not table_task:
        problems.append(f"model.task: is {Task.parse(cfg.model.task).value}, but the table was tokenized for "
                        f"{table_task.value} ({TOKENIZED.prop_task}); set model.task={table_task.value} or re-run "
                        f"`sparktune tokenize` with --task {Task.parse(cfg.model.task).value}")
    table_tokenizer = props.get(TOKENIZED.prop_tokenizer, "")
    if cfg.model.tokenizer and table_tokenizer and not _same_source(cfg.model.tokenizer, table_tokenizer):
        problems.append(f"model.tokenizer: is {cfg.model.tokenizer!r}, but the table's token ids come from "
                        f"{table_tokenizer!r} ({TOKENIZED.prop_tokenizer}); leave model.tokenizer empty to use the "
                        "table's, or re-tokenize with this tokenizer")
    elif (not cfg.model.tokenizer and table_tokenizer and not cfg.model.config_overrides
          and not _same_source(cfg.model.name, table_tokenizer)):
        problems.append(f"model.name: {cfg.model.name!r} was not the tokenizer of the table "
                        f"({TOKENIZED.prop_tokenizer}={table_tokenizer!r}), so its embeddings may not match the "
                        f"token ids; re-tokenize with {cfg.model.name!r}, or set model.tokenizer={table_tokenizer} "
                        "to confirm they share a vocabulary")
    raw_length = props.get(TOKENIZED.prop_max_length)
    try:
        table_length = int(raw_length) if raw_length not in (None, "") else None
    except ValueError:
        table_length = None
        problems.append(f"data.table: property {TOKENIZED.prop_max_length}={raw_length!r} is not a number; "
                        "re-run `sparktune tokenize`")
    positions = model_max_positions
    if positions is None:
        positions = next((int(cfg.model.config_overrides[k]) for k in _POSITION_KEYS
                          if isinstance(cfg.model.config_overrides.get(k), int)), None)
    length = min(x for x in (table_length, cfg.data.max_length) if x) if (table_length or cfg.data.max_length) else None
    if positions and length and length > positions:
        key = "data.max_length" if cfg.data.max_length and cfg.data.max_length == length else "data.table"
        problems.append(f"{key}: sequences of up to {length} tokens ({TOKENIZED.prop_max_length}={raw_length}, "
                        f"data.max_length={cfg.data.max_length}) do not fit the model's {positions} positions; set "
                        f"data.max_length={positions} or re-tokenize with --max-length {positions}")
    return problems


def check_rows_fit_model(*, labels, max_token_id: int, vocab_size: int | None, num_labels: int | None,
                         table: str, split: str) -> list[str]:
    """Problems no retry fixes, found in a rank's rows: labels outside the model's classes, token
    ids past its embeddings."""
    problems = []
    if labels is not None and num_labels:
        bad = sorted({int(x) for x in labels if not 0 <= int(x) < num_labels})
        if bad:
            problems.append(f"model.num_labels: is {num_labels}, but split {split!r} of {table} has labels "
                            f"{bad[:10]} outside 0..{num_labels - 1}; set model.num_labels (and label_names) to "
                            "cover every class, or fix the labels and re-run ingest/tokenize")
    if vocab_size and max_token_id >= vocab_size:
        problems.append(f"model.name: the model has {vocab_size} token embeddings, but split {split!r} of {table} "
                        f"holds token id {max_token_id}; the table was tokenized with another tokenizer: re-tokenize "
                        "with the model's tokenizer (or fix model.config_overrides.vocab_size)")
    return problems
