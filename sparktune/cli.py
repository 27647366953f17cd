"""The ``sparktune`` command: one subcommand per stage.

Each stage module defines ``add_cli(subparsers)``, which adds its parser and sets
``func(args) -> int``. Modules are imported lazily so ``sparktune --help`` stays fast and a
stage's heavy imports (torch, pyspark) load only when that stage runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sparktune.errors import SparktuneError

__all__ = ["main", "build_parser"]

# (module, its subcommands): the order here is the order --help lists them.
STAGE_MODULES = [
    "sparktune.ingest",
    "sparktune.tokenize",
    "sparktune.stats",
    "sparktune.train.cli",
    "sparktune.evaluate",
    "sparktune.registry",
    "sparktune.serve",
    "sparktune.pipeline",
    "sparktune.openai.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparktune",
        description="Fine-tune language models on Spark and Delta Lake tables.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in STAGE_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # a stage not built yet in this checkout
            raise
        module.add_cli(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SparktuneError as exc:
        print(f"sparktune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
