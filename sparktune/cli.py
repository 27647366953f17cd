"""The ``sparktune`` command: one subcommand per stage, one grammar for all of them.

Every stage's parser is made by ``stage_parser``, which gives it the common flags
(``--master``, ``--remote``, ``--tracking-uri``, ``--experiment``, ``--json``). A stage's handler
takes ``(args, ctx)`` and returns its typed result (``sparktune.results.StageResult``); this
module prints ``result.summary()`` or, with ``--json``, one JSON object. ``ctx`` builds the
SparkSession and the MLflow ``Tracker`` from the common flags, once, on first use.

A stage's flags are generated from its settings dataclass (``sparktune.settings``), the same
class that is its section of the pipeline config. With ``--json`` stdout holds exactly one JSON
object: the result, or on failure ``{"error": ..., "kind": "usage"|"user"|"internal", ...}``.

Stage modules keep their heavy imports (torch, pyspark) inside functions, so ``sparktune --help``
stays fast; a stage module that fails to import stops the command with its name (a typo never
hides a subcommand).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from sparktune.env import env_flag
from sparktune.errors import SparktuneError, user_error
from sparktune.redact import install_log_redaction, redact

__all__ = ["main", "build_parser", "stage_parser", "Context", "common_parser", "StageImportError"]

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
    group.add_argument("--verbose", action="store_true",
                       help="on failure also print the Python traceback and Spark's Java log (default: a message)")
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

            self._spark = get_spark(master=getattr(self.args, "master", None),
                                    remote=getattr(self.args, "remote", None) or None)
            if not _verbose(self.args):
                _quiet_jvm_logs(self._spark)
        return self._spark

    def tracker(self, experiment: str | None = None):
        if self._tracker is None:
            from sparktune.tracking import Tracker

            self._tracker = Tracker(getattr(self.args, "tracking_uri", None),
                                    getattr(self.args, "experiment", None) or experiment or "sparktune")
        return self._tracker


class StageImportError(SparktuneError):
    """A stage module of ``STAGE_MODULES`` could not be imported: an installation or code error."""


class _Parser(argparse.ArgumentParser):
    """Remembers a usage error's message, so that ``--json`` can report it as one JSON object."""

    usage_error: str | None = None

    def error(self, message: str):
        _Parser.usage_error = message
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sparktune",
        description="Fine-tune language models on Spark and Delta Lake tables.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in STAGE_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # any failure, a missing module included: never a silently missing subcommand
            raise StageImportError(f"the stage module {module_name} failed to import: {type(exc).__name__}: "
                                   f"{exc}") from exc
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


def _verbose(args) -> bool:
    return bool(getattr(args, "verbose", False)) or env_flag("SPARKTUNE_VERBOSE")


def _quiet_jvm_logs(spark) -> None:
    """Without --verbose a failed Spark task prints no Java stack: the error reaches the user as one message.

    Spark logs a task's exception (with its stack) at ERROR from the executor and the scheduler
    before the driver sees it; in local mode that is this terminal. FATAL keeps a dying JVM's word.
    """
    try:
        jvm = spark.sparkContext._jvm  # classic sessions only; Spark Connect servers log elsewhere
        level = jvm.org.apache.logging.log4j.Level.FATAL
        for name in ("org.apache.spark", "org.apache.hadoop", "org.apache.spark.sql.delta", "org.apache.parquet"):
            jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(name, level)
        jvm.org.apache.logging.log4j.core.config.Configurator.setRootLevel(level)
    except Exception:  # noqa: S110 - Connect, or a JVM without log4j2: its logs stay as they are
        pass


def _quiet_python_logs() -> None:
    import logging

    # PySpark logs every SQL error with the whole Java stack (as JSON) before raising it.
    for name in ("SQLQueryContextLogger", "DataFrameQueryContextLogger"):
        logging.getLogger(name).disabled = True


def _command(args) -> str:
    """``tokenize``, ``openai score``: the subcommand, for messages."""
    return " ".join(str(part) for part in (getattr(args, "command", None), getattr(args, "openai_command", None))
                    if part)


def _emit_error(as_json: bool, command: str, kind: str, message: str, code: int) -> int:
    """With ``--json`` a failure is one JSON object on stdout too (the message also went to stderr)."""
    if as_json:
        print(json.dumps({"error": message, "kind": kind, "command": command, "exit_code": code}, sort_keys=True))
        sys.stdout.flush()
    return code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
    except StageImportError as exc:
        print(f"sparktune: error: {exc} (a broken installation or a bug: reinstall, or run with that module fixed)",
              file=sys.stderr)
        return _emit_error("--json" in argv, "", "internal", str(exc), 1)
    _Parser.usage_error = None
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed to stderr)
        if exc.code and _Parser.usage_error is not None:
            return _emit_error("--json" in argv, "", "usage", _Parser.usage_error, int(exc.code))
        raise
    func = getattr(args, "func", None)
    if not func:
        parser.print_help()
        return 2
    as_json = getattr(args, "json", False)
    command = _command(args)
    verbose = _verbose(args)
    install_log_redaction()
    if not verbose:
        _quiet_python_logs()
    try:
        if len(inspect.signature(func).parameters) >= 2:
            with _stdout_to_stderr() if as_json else contextlib.nullcontext():
                result = func(args, Context(args))
            return _emit(result, as_json)
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        known = user_error(exc)
        if verbose:
            import traceback

            traceback.print_exc(file=sys.stderr)
        if known is not None:
            # Every message is redacted here, whoever raised it: a URI's password never reaches the terminal.
            message = redact(str(known))
            print(f"sparktune {command}: error: {message}", file=sys.stderr)
            return _emit_error(as_json, command, "user", message, 2)
        if verbose and not as_json:
            raise
        first = f"{type(exc).__name__}: {redact(next((line for line in str(exc).splitlines() if line.strip()), ''))}"
        print(f"sparktune {command}: internal error: {first[:500]}\n"
              "(a bug, or a failure sparktune does not explain yet: run again with --verbose for the full trace and "
              "report it)", file=sys.stderr)
        return _emit_error(as_json, command, "internal", first[:500], 1)


if __name__ == "__main__":
    sys.exit(main())
