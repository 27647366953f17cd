"""The ``sparktune`` command: one subcommand per stage, one grammar for all of them.

Every stage's parser is made by ``stage_parser``, which gives it the common flags
(``--master``, ``--remote``, ``--tracking-uri``, ``--experiment``, ``--json``). A stage's handler
takes ``(args, ctx)`` and returns its typed result (``sparktune.results.StageResult``); this
module prints ``result.summary()`` or, with ``--json``, one JSON object. ``ctx`` builds the
SparkSession and the MLflow ``Tracker`` from the common flags, once, on first use.

Stage modules are imported lazily so ``sparktune --help`` stays fast and a stage's heavy
imports (torch, pyspark) load only when that stage runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from sparktune.errors import SparktuneError

__all__ = ["main", "build_parser", "stage_parser", "Context", "common_parser"]

# The order here is the order --help lists them.
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


def common_parser() -> argparse.ArgumentParser:
    """The flags every stage accepts (an argparse parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("common options")
    group.add_argument("--master", help="Spark master when sparktune builds the session (default: spark-submit's, "
                                        "else $SPARKTUNE_SPARK_MASTER, else local[*])")
    group.add_argument("--remote", help="Spark Connect URL (sc://host:port); default: $SPARK_REMOTE")
    group.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, 'databricks' on "
                                              "Databricks, else sqlite:///$SPARKTUNE_HOME/mlflow.db)")
    group.add_argument("--experiment", help="MLflow experiment for runs this command opens (default: sparktune)")
    group.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return common


def stage_parser(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand parser with the common flags."""
    return subparsers.add_parser(name, parents=[common_parser()], **kwargs)


@dataclass
class Context:
    """What a handler needs besides its own flags, built from the common flags on first use."""

    args: argparse.Namespace
    _spark: Any = field(default=None, repr=False)
    _tracker: Any = field(default=None, repr=False)

    def spark(self):
        if self._spark is None:
            from sparktune.spark import get_spark

            kwargs = {"master": getattr(self.args, "master", None)}
            remote = getattr(self.args, "remote", None)
            if remote:
                kwargs["remote"] = remote
            self._spark = get_spark(**kwargs)
        return self._spark

    def tracker(self, experiment: str | None = None):
        if self._tracker is None:
            from sparktune.tracking import Tracker

            self._tracker = Tracker(getattr(self.args, "tracking_uri", None),
                                    getattr(self.args, "experiment", None) or experiment or "sparktune")
        return self._tracker


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
                continue  # a stage not built in this checkout
            raise
        module.add_cli(subparsers)
    return parser


@contextlib.contextmanager
def _stdout_to_stderr():
    """Everything a stage prints goes to stderr, so that with --json stdout holds one JSON object:
    Python's prints, and at the descriptor level what child processes (torchrun) write."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no real stdout descriptor (an embedding host): Python's prints only
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _emit(result: Any, as_json: bool) -> int:
    if isinstance(result, int) or result is None:
        return int(result or 0)
    if as_json:
        print(result.to_json())
    else:
        print(result.summary())
    sys.stdout.flush()
    from sparktune.databricks import publish_task_values

    # In a Databricks job the next task reads this one's run_id, model_uri, ... as task values.
    publish_task_values(result.to_dict())
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if not func:
        parser.print_help()
        return 2
    as_json = getattr(args, "json", False)
    try:
        if len(inspect.signature(func).parameters) >= 2:
            with _stdout_to_stderr() if as_json else contextlib.nullcontext():
                result = func(args, Context(args))
            return _emit(result, as_json)
        return int(func(args) or 0)
    except SparktuneError as exc:
        print(f"sparktune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
