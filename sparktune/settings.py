"""A stage's settings are one declaration: a frozen dataclass with a docstring per field.

The same class is the stage function's argument, the source of its command-line flags and its
section of the pipeline config, so a default or a help text is written once::

    @dataclass(frozen=True, kw_only=True)
    class StatsSettings:
        table: str
        \"\"\"Tokenized TABLE (a path or a catalog name).\"\"\"
        plot: str = option("", metavar="FILE.png")
        \"\"\"Also write a histogram of token lengths per split to this PNG file.\"\"\"

    def stats_stage(spark, settings: StatsSettings, tracker=None) -> StatsResult: ...

    def add_cli(subparsers):
        add_stage(subparsers, Stage("stats", StatsSettings, stats_stage, help="..."))

- ``field_help(cls)``: the fields' docstrings (attribute docstrings read from the class source
  with ``ast``, litgpt style), the help of their flags and the reference of their config keys.
- ``option(default, ...)``: a field with command-line details: other flag names kept for
  compatibility, a positional argument, a metavar, or ``cli_required`` (a flag the command line
  must give although the pipeline has a default, e.g. an input the pipeline wires from the stage
  before).
- ``add_arguments(parser, cls)``: one flag per field, ``--max-length`` for ``max_length``; ``bool``
  becomes ``--flag/--no-flag``, an enum or ``Literal`` its choices, a list a comma-separated (and
  repeatable) flag. A field without a default is a required flag. The help is the docstring plus
  the default.
- ``from_args(cls, args)``: the settings from parsed arguments, built by ``sparktune.config``'s
  loader (the pipeline's): the same type coercion and ``__post_init__`` checks, every problem
  reported at once, each naming its flag.
- ``Stage`` / ``add_stage``: a subcommand whose handler is ``stage.run(spark, settings, tracker)``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

from sparktune.errors import ConfigError

__all__ = [
    "Stage",
    "add_arguments",
    "add_stage",
    "cli_default",
    "cli_required",
    "field_help",
    "flag_names",
    "from_args",
    "option",
    "show_default",
]

_META = "sparktune.cli"


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           aliases: tuple[str, ...] = (), positional: bool = False, metavar: str | None = None,
           cli_required: bool = False, choices: tuple[str, ...] | None = None) -> Any:
    """A settings field with command-line details (its help is still the field's docstring).

    ``aliases``: more flag names (``--full`` for ``force``); ``positional``: an argument without a
    flag (``sparktune sql QUERY``); ``cli_required``: the command line must give it although the
    field has a default (the pipeline wires it, or its empty default means "skip" there);
    ``choices``: the flag's choices for a ``str`` field (its ``__post_init__`` checks them for the
    pipeline).
    """
    meta = {_META: {"aliases": tuple(aliases), "positional": positional, "metavar": metavar,
                    "cli_required": cli_required, "choices": choices}}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _meta(f: dataclasses.Field) -> dict:
    return f.metadata.get(_META, {})


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass and its bases: the string right after each field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (a frozen app): flags without help
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def cli_default(f: dataclasses.Field) -> Any:
    """The field's default (``dataclasses.MISSING`` when it has none)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def cli_required(f: dataclasses.Field) -> bool:
    """Whether the command line must give this field."""
    return not _has_default(f) or bool(_meta(f).get("cli_required"))


def flag_names(f: dataclasses.Field) -> list[str]:
    """``["--max-length"]`` for ``max_length``, then the aliases; ``[name]`` for a positional."""
    if _meta(f).get("positional"):
        return [f.name]
    return ["--" + f.name.replace("_", "-"), *_meta(f).get("aliases", ())]


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return tp


def _choices(tp: Any) -> list[str] | None:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return [str(m.value) for m in tp]
    if typing.get_origin(tp) is Literal:
        return [str(a) for a in typing.get_args(tp)]
    return None


def show_default(value: Any) -> str:
    """A default as a user writes it: ``classification``, ``false``, ``a,b``; empty for None."""
    if value is None:
        return ""
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(show_default(v) for v in value)
    if isinstance(value, str) and value != value.strip():
        return repr(value)  # a leading or trailing space is part of the value
    return str(value).replace("\n", "\\n")


def _help(f: dataclasses.Field, doc: str) -> str:
    text = doc
    default = cli_default(f)
    if not cli_required(f) and default not in (None, "", [], ()):
        shown = show_default(default)
        text = f"{text} (default: {shown})" if text else f"default: {shown}"
    return text.replace("%", "%%")  # argparse %-formats help texts


def add_arguments(parser: argparse.ArgumentParser | Any, cls: type) -> None:
    """One command-line argument per field of the settings dataclass ``cls``.

    A flag not given leaves no attribute (``argparse.SUPPRESS``): ``from_args`` then takes the
    field's default, so the default lives in the dataclass alone.
    """
    hints = typing.get_type_hints(cls)
    docs = field_help(cls)
    own = set(cls.__dict__.get("__annotations__", {}))
    for f in sorted(_fields(cls), key=lambda f: f.name not in own):  # the class's own flags first, then its bases'

        tp = _strip_optional(hints[f.name])
        names = flag_names(f)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        meta = _meta(f)
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin in (list, tuple):
            kwargs["action"] = "append"  # repeatable, each value comma-separated (the loader splits it)
            kwargs.setdefault("metavar", "A,B,...")
        elif _choices(tp) is not None or meta.get("choices"):
            kwargs["choices"] = _choices(tp) or list(meta["choices"])
        elif tp in (int, float):
            kwargs["type"] = tp
        elif tp is not str:
            raise TypeError(f"{cls.__name__}.{f.name}: type {tp} has no command-line form")
        if meta.get("positional"):
            del kwargs["dest"]
            if not cli_required(f):
                kwargs["nargs"] = "?"
        elif cli_required(f):
            kwargs["required"] = True
        action = parser.add_argument(*names, **kwargs)
        action.help = _help(f, docs.get(f.name, ""))  # after: BooleanOptionalAction adds its own default


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """The settings ``cls`` from the flags in ``args`` (defaults for those not given).

    Built by the pipeline's config loader, so values are coerced and checked the same way; its
    problems name the flags (``--max-length: must be at least 2``), all of them at once.
    """
    from sparktune.config import load_config

    data: dict[str, Any] = {}
    for f in _fields(cls):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if isinstance(value, list):  # an appended flag: every value, each maybe comma-separated
            value = [part.strip() for item in value for part in str(item).split(",") if part.strip()]
        data[f.name] = value
    try:
        return load_config(cls, data=data) if data else load_config(cls)
    except ConfigError as exc:
        raise ConfigError([_name_flag(cls, p) for p in exc.problems]) from None


def _name_flag(cls: type, problem: str) -> str:
    key, sep, rest = problem.partition(":")
    for f in _fields(cls):
        if key == f.name or key.startswith(f.name + "["):
            return f"{flag_names(f)[0]}{key[len(f.name):]}{sep}{rest}"
    return problem


@dataclasses.dataclass(frozen=True)
class Stage:
    """A subcommand: its name, settings class and function ``run(spark, settings, tracker)``.

    ``spark``/``tracker``: whether ``run`` gets a SparkSession / an MLflow ``Tracker`` (else None);
    ``experiment``: the tracker's default experiment; ``check``: run on the settings before the
    session starts (a missing credential fails before a JVM does).
    """

    name: str
    settings: type
    run: Callable[..., Any]
    help: str
    description: str | None = None
    spark: bool = True
    tracker: bool = False
    experiment: str = "sparktune"
    epilog: str | None = None
    check: Callable[[Any], None] | None = None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps help text without breaking at hyphens: a flag named in a setting's help
    (``--torch-threads``) stays whole, so it can be copied (and its help compared word by word)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def add_stage(subparsers: Any, stage: Stage) -> argparse.ArgumentParser:
    """Add ``stage``'s subcommand: the common flags, one flag per settings field, its handler."""
    from sparktune.cli import stage_parser

    parser = stage_parser(subparsers, stage.name, help=stage.help, description=stage.description or stage.help,
                          epilog=stage.epilog, formatter_class=HelpFormatter)
    add_arguments(parser.add_argument_group(f"{stage.name} settings"), stage.settings)

    def handler(args: argparse.Namespace, ctx: Any) -> Any:
        settings = from_args(stage.settings, args)
        if stage.check is not None:
            stage.check(settings)
        spark = ctx.spark() if stage.spark else None
        tracker = ctx.tracker(stage.experiment) if stage.tracker else None
        return stage.run(spark, settings, tracker)

    parser.set_defaults(func=handler, stage=stage)
    return parser
