"""``sparktune train --config FILE [key=value ...]``: fine-tune on a tokenized Delta table.

Prints the ``TrainResult`` summary (its last two lines are ``run_id: ...`` and
``model_uri: ...``), or with ``--json`` one JSON object. ``--tracking-uri`` and
``--experiment`` override ``mlflow.tracking_uri`` and ``mlflow.experiment``.
"""

from __future__ import annotations

import argparse

from sparktune.cli import stage_parser
from sparktune.tables import check_writes

__all__ = ["add_cli", "run_cli"]

_EPILOG = """\
overrides (dotted keys of the config), e.g.:
  data.table=./data/imdb_tokenized   output_dir=./out/run1   train.max_steps=50
  data.train_limit=2000 data.eval_limit=500   distributor.num_processes=2
  distributor.local_mode=false   mlflow.experiment=NAME
  resume=true   (continue a stopped job from its newest complete checkpoint, on the data version it pinned)
"""


def add_cli(subparsers) -> None:
    parser = stage_parser(
        subparsers, "train",
        help="fine-tune a model on a tokenized Delta table (TorchDistributor + Hugging Face Trainer)",
        description="Fine-tune a language model on a tokenized Delta table with TorchDistributor, "
                    "tracked in one MLflow run.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML training config (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.set_defaults(func=run_cli)


def run_cli(args, ctx):
    from sparktune.train.config import load_train_config
    from sparktune.train.distribute import run_training
    from sparktune.train.memory import prefetch_model_shape

    overrides = list(args.overrides)
    # The common flags win over the config file and over key=value overrides of the same keys.
    if getattr(args, "tracking_uri", None):
        overrides.append(f"mlflow.tracking_uri={args.tracking_uri}")
    if getattr(args, "experiment", None):
        overrides.append(f"mlflow.experiment={args.experiment}")
    cfg = load_train_config(args.config, overrides)
    check_writes(None, "train", folders={"output_dir": cfg.output_dir, "checkpoint.dir": cfg.checkpoint.dir,
                                         "data.staging_dir": cfg.data.staging_dir},
                 inputs={"data.table": cfg.data.table or cfg.data.location})
    # torch and transformers (the driver's memory plan) load while Spark starts, not after it.
    prefetch_model_shape(cfg)
    tracker = None
    if cfg.mlflow.enabled:
        from sparktune.tracking import Tracker

        tracker = Tracker(cfg.mlflow.tracking_uri or None, cfg.mlflow.experiment)
    return run_training(cfg, spark=ctx.spark(), tracker=tracker)
