"""Builders shared by test_evaluate, test_registry, test_serve and test_predict: small real models,
tables, and one tiny real training run whose registered model the serving tests use as is."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pandas as pd

from sparktune.tasks import TOKENIZED

LABELS = {0: "negative", 1: "positive"}


def build_classifier(minilm_path: str, out_dir: str, seed: int = 0) -> str:
    """MiniLM with a fresh 2-class head (seeded): real weights, real tokenizer, save_pretrained layout."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path, num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
    )
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def build_tiny_gpt2(tokenizer_path: str, out_dir: str) -> str:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    tok.pad_token = tok.eos_token  # GPT-2 has no pad token
    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def tokenized_frame(sample_dir: str, tokenizer_path: str, max_length: int = 128, n: int | None = None) -> pd.DataFrame:
    """The tokenized-table layout: row_id, split, label, input_ids (unpadded), n_tokens, truncated."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    raw = pd.read_parquet(os.path.join(sample_dir, "test.parquet"))
    if n:
        raw = raw.head(n)
    full = tok(raw["text"].tolist(), truncation=False)["input_ids"]
    ids = tok(raw["text"].tolist(), truncation=True, max_length=max_length)["input_ids"]
    t = TOKENIZED
    return pd.DataFrame(
        {
            t.row_id: [f"test-{i:04d}" for i in range(len(raw))],  # IMDB ids repeat across pos/neg
            t.split: "test",
            t.label: raw["label"].astype("int32"),
            t.input_ids: [list(map(int, x)) for x in ids],
            t.n_tokens: [len(x) for x in ids],
            t.truncated: [len(f) > max_length for f in full],
        }
    )


def write_tokenized_table(spark, frame: pd.DataFrame, path: str) -> str:
    from sparktune.tables import write_table

    rows = [
        (r.row_id, r.split, int(r.label), list(r.input_ids), int(r.n_tokens), bool(r.truncated))
        for r in frame.itertuples(index=False)
    ]
    write_table(spark.createDataFrame(rows, TOKENIZED.schema), path)
    return path


@dataclass
class TrainedModel:
    """What a real `sparktune train` run left behind, registered by `sparktune register`."""

    tracking_uri: str
    run_id: str
    model_uri: str
    """The logged model (models:/m-...), as training printed it."""
    registered_uri: str
    """models:/<name>@champion, as register set it."""
    table: str
    """The tokenized table it was trained on (train and test splits)."""


def tiny_classifier_config(output_dir: str, minilm_path: str, table: str, tracking_uri: str, experiment: str) -> dict:
    """A training config for two optimizer steps of MiniLM in one TorchDistributor process."""
    return {
        "output_dir": output_dir,
        "model": {"name": minilm_path, "task": "classification", "num_labels": 2,
                  "label_names": ["negative", "positive"]},
        "data": {"table": table, "eval_split": ""},
        "train": {"batch_size": 8, "max_steps": 2, "logging_steps": 1, "learning_rate": 1e-4},
        "checkpoint": {"strategy": "no"},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": experiment, "system_metrics": False},
        "distributor": {"num_processes": 1, "local_mode": True, "max_restarts": 0},
    }


def train_tiny_classifier(spark, base, minilm_path: str, name: str = "imdb-clf") -> TrainedModel:
    """Two optimizer steps of MiniLM on 16 reviews, in one TorchDistributor process (the real
    training path: it logs the model through sparktune.train.modelio), then registered."""
    from test_train_support import write_tokenized_table as write_delta_rs_table

    from sparktune.registry import register_model
    from sparktune.tracking import Tracker
    from sparktune.train.distribute import run_training

    uri = f"sqlite:///{base}/mlflow.db"
    tracker = Tracker(uri, "model-tests")
    tracker.experiment_id()  # artifacts beside the database, not ./mlruns
    table = write_delta_rs_table(base / "tokens", minilm_path, n_train=16, n_test=24, max_length=64)
    result = run_training(tiny_classifier_config(str(base / "out"), minilm_path, table, uri, "model-tests"), spark)
    registered = register_model(result.run_id, name, tracker=tracker, alias="champion")
    return TrainedModel(uri, result.run_id, result.model_uri, registered.alias_uri or "", table)
