"""``sparktune train --config FILE [key=value ...]``: fine-tune on a tokenized Delta table.

Prints a summary whose last two lines are ``run_id: <MLflow run id>`` and
``model_uri: <URI for mlflow.pyfunc.load_model>``, for scripts and later stages to parse.
"""

from __future__ import annotations

import argparse

__all__ = ["add_cli", "run_cli", "format_summary"]

_EPILOG = """\
overrides (dotted keys of the config), e.g.:
  data.table=./data/imdb_tokenized   output_dir=./out/run1   train.max_steps=50
  data.train_limit=2000 data.eval_limit=500   distributor.num_processes=2
  distributor.local_mode=false   mlflow.tracking_uri=sqlite:///mlflow.db   mlflow.experiment=NAME
  resume=true   (continue a stopped job from its latest complete checkpoint)
"""


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a model on a tokenized Delta table (TorchDistributor + Hugging Face Trainer)",
        description="Fine-tune a language model on a tokenized Delta table with TorchDistributor, "
                    "tracked in one MLflow run.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML training config (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.set_defaults(func=run_cli)


def format_summary(result: dict) -> str:
    lines = ["sparktune train: done"]
    for key in ("table", "version", "task", "world_size", "global_step", "attempts", "train_loss",
                "eval_loss", "eval_accuracy", "eval_f1", "pad_share", "samples_per_second", "train_seconds", "model_dir"):
        if result.get(key) is not None:
            value = result[key]
            lines.append(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    lines.append(f"run_id: {result.get('run_id', '')}")
    lines.append(f"model_uri: {result.get('model_uri', '')}")
    return "\n".join(lines)


def run_cli(args) -> int:
    from sparktune.train.config import load_train_config
    from sparktune.train.distribute import run_training

    cfg = load_train_config(args.config, args.overrides)
    result = run_training(cfg)
    print(format_summary(result))
    return 0
