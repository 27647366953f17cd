"""Helpers for the training tests: small tokenized Delta tables written with delta-rs.

They have the columns and properties `sparktune tokenize` writes, built without Spark so the
tests that only need a table stay fast. ``test_train_distributed.py`` also goes through the
real ``tokenize_table``.
"""

import os

import pandas as pd

from sparktune.tasks import TOKENIZED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMDB_SAMPLE = os.path.join(ROOT, "tests", "data", "imdb_sample")


def imdb_rows(split: str, n: int) -> pd.DataFrame:
    frame = pd.read_parquet(os.path.join(IMDB_SAMPLE, f"{split}.parquet"))
    frame = frame.sort_values("id").head(n)
    return frame


def nest(flat: dict) -> dict:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (dotted overrides as a config dict)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def write_tokenized_table(path, tokenizer_path, *, task="classification", n_train=64, n_test=32,
                          max_length=64, tokenizer_property=None, train_rows=None, gguf_file=None, relabel=None):
    """Tokenize IMDB sample reviews with the real tokenizer into a Delta table at ``path``."""
    import pyarrow as pa
    from deltalake import write_deltalake
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path, **({"gguf_file": gguf_file} if gguf_file else {}))
    records = []
    for split, n in (("train", n_train), ("test", n_test)):
        frame = imdb_rows(split, n)
        if split == "train" and train_rows is not None:
            frame = frame.head(train_rows)
        enc = tok(list(frame["text"]), truncation=True, max_length=max_length,
                  add_special_tokens=task == "classification")
        for (_, row), ids in zip(frame.iterrows(), enc["input_ids"]):
            records.append({
                TOKENIZED.row_id: f"{split}/{int(row['id']):06d}",
                TOKENIZED.split: split,
                TOKENIZED.label: int(relabel(split, int(row["id"]), int(row["label"])) if relabel else row["label"]),
                TOKENIZED.input_ids: [int(i) for i in ids],
                TOKENIZED.n_tokens: len(ids),
                TOKENIZED.truncated: len(ids) >= max_length,
            })
    table = pa.Table.from_pylist(records, schema=TOKENIZED.arrow_schema())
    from deltalake import DeltaTable

    write_deltalake(str(path), table, mode="overwrite")
    # delta-rs rejects non-delta keys in write_deltalake(configuration=...), not in ALTER.
    DeltaTable(str(path)).alter.set_table_properties({
        TOKENIZED.prop_tokenizer: tokenizer_property or str(tokenizer_path),
        TOKENIZED.prop_max_length: str(max_length),
        TOKENIZED.prop_task: task,
    }, raise_if_not_exists=False)
    return str(path)


def tiny_gpt2_overrides(tmp_path, table, mlflow_uri, **extra):
    """Overrides for a 2-layer, 64-wide GPT-2 with the real GPT-2 tokenizer."""
    overrides = {
        "output_dir": str(tmp_path / "out"),
        "model.name": "tiny-gpt2",
        "model.config_overrides": {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2,
                                   "n_positions": 128},
        "data.table": str(table),
        "data.eval_split": "test",
        "train.batch_size": 4,
        "train.eval_batch_size": 8,
        "train.learning_rate": 3e-3,
        "train.max_steps": 8,
        "train.logging_steps": 1,
        "checkpoint.steps": 4,
        "mlflow.tracking_uri": mlflow_uri,
        "mlflow.experiment": "tests",
        "mlflow.system_metrics": False,
        "distributor.num_processes": 2,
    }
    overrides.update(extra)
    return overrides
