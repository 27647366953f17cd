"""Entry point of one training rank: ``python -m sparktune.train.train`` (torchrun runs this).

    torchrun --nproc_per_node 2 -m sparktune.train.train --config jobs/configs/imdb_local.yaml \
        data.table=./data/imdb_tokenized output_dir=./out/imdb

The recipe itself is ``sparktune.train.recipe.train``; this module keeps the command (and the
names older code imports from here).
"""

from __future__ import annotations

import argparse
import os
import sys

from sparktune.errors import SparktuneError
from sparktune.train.checkpoints import latest_complete_checkpoint
from sparktune.train.config import load_train_config
from sparktune.train.recipe import train

__all__ = ["train", "latest_complete_checkpoint", "main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparktune.train.train",
                                     description="One rank of a sparktune training job (run under torchrun).")
    parser.add_argument("--config", required=True, help="YAML training config")
    parser.add_argument("--json", action="store_true", help="rank 0 prints the result as one JSON object")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        result = train(cfg)
    except SparktuneError as exc:
        print(f"sparktune train: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print(result.to_json() if args.json else result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
