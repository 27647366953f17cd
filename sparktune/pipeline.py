"""The whole pipeline, stage by stage: ingest -> tokenize -> train -> evaluate -> register.

One YAML file holds a typed section per stage (``ingest``, ``tokenize``, ``train`` — a full
training config —, ``evaluate``, ``register``). A section is the stage's own settings class, the
one its subcommand's flags come from (``tokenize.max_length`` is ``sparktune tokenize
--max-length``, with the same default and help); the inputs a stage reads from the stage before
(``tokenize.input``, ``evaluate.table``, ``evaluate.model``, ...) are wired by the pipeline. The
whole file and its overrides are
validated before anything runs: unknown keys, bad values and sections that disagree (the
tokenizer, max length or task of ``tokenize`` against the model of ``train``) are reported
together, so a typo in the training section never surfaces after an hour of ingest.

Each stage is the same function its own subcommand runs and leaves a Delta table or an MLflow
entry behind, so any stage can be rerun or inspected alone; tokenize is skipped when its
table is up to date. The defaults (``jobs/configs/pipeline_local.yaml``) run on a laptop:
local Spark, Delta tables under ./data, MLflow under ./.sparktune.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sparktune.config import deep_merge, load_config, raise_if
from sparktune.evaluate.spark_eval import EvaluateSettings, evaluate_stage
from sparktune.ingest import IngestSettings, ingest_stage
from sparktune.registry import RegisterSettings, register_stage
from sparktune.results import StageResult
from sparktune.tasks import Task
from sparktune.tokenize import TokenizeSettings, default_max_length, tokenize_stage
from sparktune.train.config import TrainConfig

if TYPE_CHECKING:
    from sparktune.evaluate import EvaluateResult
    from sparktune.ingest import IngestResult
    from sparktune.registry import RegisterResult
    from sparktune.tokenize import TokenizeResult
    from sparktune.train.result import TrainResult

__all__ = ["PipelineConfig", "PipelineResult", "run_pipeline", "load_pipeline_config", "DEFAULT_PIPELINE_CONFIG",
           "CONFIG_LINKS", "RUN_LINKS"]

DEFAULT_PIPELINE_CONFIG = os.path.join("jobs", "configs", "pipeline_local.yaml")


@dataclass
class PipelineConfig:
    """The pipeline's sections: each stage's own settings class (its flags' declaration), train's
    the training config."""

    # Sections have no defaults so the loader builds each itself and prefixes its problems
    # with the section name (train.model.name, not model.name).
    ingest: IngestSettings
    tokenize: TokenizeSettings
    train: TrainConfig
    evaluate: EvaluateSettings
    register: RegisterSettings

    def __post_init__(self):
        raise_if(sections_disagree(self))


PIPELINE_SECTIONS = {"ingest": IngestSettings, "tokenize": TokenizeSettings, "train": TrainConfig,
                     "evaluate": EvaluateSettings, "register": RegisterSettings}

# A stage's inputs that the pipeline wires from an earlier stage. Known from the config: filled in
# when it loads (a value set in the file must be the same). Known once train has run: left empty.
CONFIG_LINKS = {"tokenize.input": "ingest.output", "train.data.table": "tokenize.output",
                "evaluate.table": "tokenize.output"}
RUN_LINKS = {"evaluate.model": "the model train logged", "evaluate.run_id": "train's MLflow run",
             "register.run_id": "train's MLflow run"}


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else getattr(cfg, part, None)
    return cfg


def sections_disagree(cfg: PipelineConfig) -> list[str]:
    """Problems between sections: what a stage writes must be what the next one reads."""
    problems: list[str] = []
    data, model = cfg.train.data, cfg.train.model
    for key, source in CONFIG_LINKS.items():
        value, wired = _get(cfg, key), _get(cfg, source)
        if value and value != wired:
            problems.append(f"{key}: is {value!r} but {source} is {wired!r}; leave {key} out (the pipeline sets "
                            "it) or make them equal")
    for key, source in RUN_LINKS.items():
        if _get(cfg, key):
            problems.append(f"{key}: is {_get(cfg, key)!r} but the pipeline sets it to {source}; leave it out")
    if model.task != "auto" and Task.parse(model.task, "train.model.task") is not cfg.tokenize.task:
        problems.append(f"train.model.task: is {model.task} but tokenize.task is {cfg.tokenize.task.value}; "
                        "the model must be trained for the task the table was tokenized for")
    if model.tokenizer and model.tokenizer != cfg.tokenize.tokenizer:
        problems.append(f"train.model.tokenizer: is {model.tokenizer!r} but the table is tokenized with "
                        f"{cfg.tokenize.tokenizer!r}; token ids only mean something to the tokenizer that made them")
    if data.max_length is not None and cfg.tokenize.max_length is not None \
            and data.max_length > cfg.tokenize.max_length:
        problems.append(f"train.data.max_length: {data.max_length} is more than tokenize.max_length "
                        f"{cfg.tokenize.max_length}; rows are never longer than they were tokenized")
    if cfg.tokenize.task is Task.INSTRUCTION:
        problems += prompt_spec(cfg).problems("tokenize")
    if cfg.evaluate.split and data.train_split == cfg.evaluate.split:
        problems.append(f"evaluate.split: {cfg.evaluate.split!r} is also train.data.train_split; "
                        "score on rows the model did not train on")
    return problems


def tokenize_settings(cfg: PipelineConfig) -> TokenizeSettings:
    """The settings the pipeline tokenizes with: ``tokenize``'s, its GGUF file and (instruction)
    class names defaulting to the model's."""
    tok, model = cfg.tokenize, cfg.train.model
    gguf = tok.gguf_file or (model.gguf_file if tok.tokenizer == model.name else "")
    labels = tok.label_names or (list(model.label_names) if tok.task is Task.INSTRUCTION else [])
    return replace(tok, gguf_file=gguf, label_names=labels)


def prompt_spec(cfg: PipelineConfig):
    """The instruction prompt of ``tokenize`` (its class names default to the model's)."""
    from sparktune.prompts import PromptSpec

    tok = tokenize_settings(cfg)
    return tok.prompt() or PromptSpec.from_labels([], tok.template, tok.answer_format)


def tokenizer_gguf(cfg: PipelineConfig) -> str:
    return tokenize_settings(cfg).gguf_file


def model_problems(cfg: PipelineConfig) -> list[str]:
    """Problems only the model's own files reveal (its vocabulary and positions), checked before
    anything runs. Reads config and tokenizer files, not weights; skipped for a model the hub
    must provide when the hub is not reachable (training will say so)."""
    model = cfg.train.model
    if model.config_overrides.get("model_type"):
        return []  # a fresh model sized from the tokenizer: nothing to disagree with
    from sparktune.models import load_tokenizer, resolve_pretrained

    try:
        from transformers import AutoConfig

        kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
        if model.gguf_file:
            kwargs["gguf_file"] = model.gguf_file
        config = AutoConfig.from_pretrained(resolve_pretrained(model.name, "train.model.name"), **kwargs)
        tokenizer = load_tokenizer(cfg.tokenize.tokenizer, tokenizer_gguf(cfg) or None)
    except (OSError, ValueError):
        return []
    problems = []
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > int(vocab):
        problems.append(f"tokenize.tokenizer: {cfg.tokenize.tokenizer!r} has {len(tokenizer)} tokens but "
                        f"train.model.name {model.name!r} embeds {vocab}; use the model's own tokenizer")
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    max_length = cfg.tokenize.max_length or default_max_length(tokenizer)
    longest = cfg.tokenize.block_size or max_length
    if cfg.tokenize.max_length is None and cfg.train.data.max_length is not None \
            and cfg.train.data.max_length > max_length:
        problems.append(f"train.data.max_length: {cfg.train.data.max_length} is more than the {max_length} tokens "
                        "tokenize keeps (tokenize.max_length is empty: the tokenizer's limit, at most 512)")
    if positions is not None and longest > int(positions):
        problems.append(f"tokenize.max_length: {longest} tokens per row but train.model.name {model.name!r} "
                        f"has {positions} positions; lower it to at most {positions}")
    return problems


def load_pipeline_config(path: str | None, overrides=()) -> PipelineConfig:
    """The pipeline config from YAML plus dotted overrides, every problem reported at once.

    The inputs of ``CONFIG_LINKS`` default to the outputs of the stages before (``train.data.table``
    to ``tokenize.output``, ...).
    """
    import yaml

    from sparktune.config import parse_overrides
    from sparktune.errors import ConfigError

    raw: dict = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError([f"config file {path} does not exist: pass an existing YAML file to --config"])
        with open(path, encoding="utf-8") as handle:
            try:
                raw = yaml.safe_load(handle) or {}
            except yaml.YAMLError as exc:
                raise ConfigError([f"{path} is not valid YAML: {exc}"]) from None
    parsed = parse_overrides(overrides)
    defaults: dict = {}
    for key, source in CONFIG_LINKS.items():  # an input an earlier stage writes: that stage's output
        value = _get(parsed, source) or _get(raw, source)
        if value and isinstance(value, str):
            defaults = deep_merge(defaults, parse_overrides([f"{key}={value}"]))
    cfg = load_config(PipelineConfig, None, overrides, data=deep_merge(defaults, raw))
    problems = model_problems(cfg)
    if problems:
        raise ConfigError(problems, path)
    return cfg


@dataclass
class PipelineResult(StageResult):
    """What each stage produced, and how long it took (seconds, wall clock)."""

    ingest: IngestResult | None = None
    tokenize: TokenizeResult | None = None
    train: TrainResult | None = None
    evaluate: EvaluateResult | None = None
    register: RegisterResult | None = None
    seconds: dict = field(default_factory=dict)
    overhead: dict = field(default_factory=dict)
    """Seconds of fixed cost inside ``seconds``: ``spark_start`` and ``mlflow_setup`` (when this run
    started them), ``train_setup`` (the train stage outside ``Trainer.train``: launching the ranks,
    imports, shard staging, model load, final evaluation and model logging)."""

    @property
    def run_id(self) -> str:
        return self.train.run_id if self.train is not None else ""

    @property
    def model_uri(self) -> str:
        return self.train.model_uri if self.train is not None else ""

    def to_dict(self) -> dict:
        return {**super().to_dict(), "run_id": self.run_id, "model_uri": self.model_uri}

    @property
    def setup_seconds(self) -> float:
        """Starting Spark and MLflow, before the first stage (not in ``seconds``)."""
        return sum(v for k, v in self.overhead.items() if k != "train_setup")

    def summary(self) -> str:
        setup = self.setup_seconds
        total = sum(self.seconds.values()) + setup
        lines = ["stage       seconds  share"]
        for stage, secs in [*([("setup", setup)] if setup else []), *self.seconds.items()]:
            lines.append(f"{stage:<10} {secs:8.1f}  {secs / total if total else 0:5.1%}")
        lines.append(f"{'total':<10} {total:8.1f}")
        if self.overhead and total:
            fixed = sum(self.overhead.values())
            parts = ", ".join(f"{k} {v:.1f}" for k, v in self.overhead.items())
            lines.append(f"fixed overhead {fixed:.1f} s ({fixed / total:.1%}: {parts}); "
                         f"work {total - fixed:.1f} s ({(total - fixed) / total:.1%})")
        lines.append(f"run_id: {self.run_id}")
        lines.append(f"model_uri: {self.model_uri}")
        return "\n".join(lines)




def run_pipeline(cfg: PipelineConfig, spark=None, tracker=None, say=print) -> PipelineResult:
    """Run every stage in order with one SparkSession and one MLflow tracker."""
    from sparktune.spark import get_spark
    from sparktune.tracking import Tracker
    from sparktune.train.distribute import run_training

    result = PipelineResult()
    clock = time.perf_counter()
    if spark is None:
        spark = get_spark()
        result.overhead["spark_start"] = time.perf_counter() - clock
    started = time.perf_counter()
    tracker = tracker or Tracker(cfg.train.mlflow.tracking_uri or None, cfg.train.mlflow.experiment)
    cfg.train.mlflow.tracking_uri = str(tracker.tracking_uri)
    cfg.train.mlflow.experiment = tracker.experiment
    result.overhead["mlflow_setup"] = time.perf_counter() - started
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        result.seconds[stage] = now - clock
        clock = now

    ing = cfg.ingest
    say(f"[1/5] ingest {ing.source} -> {ing.output}")
    result.ingest = ingest_stage(spark, ing, tracker)
    say(result.ingest.summary())
    lap("ingest")

    tok = tokenize_settings(cfg)
    say(f"[2/5] tokenize {tok.input} -> {tok.output} ({tok.tokenizer}, max_length {tok.max_length or 'auto'})")
    result.tokenize = tokenize_stage(spark, tok, tracker)
    say(result.tokenize.summary())
    lap("tokenize")

    say(f"[3/5] train {cfg.train.model.name} on {cfg.train.data.table}")
    result.train = run_training(cfg.train, spark=spark, tracker=tracker)
    say(result.train.summary())
    lap("train")
    if result.train.train_seconds:
        result.overhead["train_setup"] = max(0.0, result.seconds["train"] - float(result.train.train_seconds))

    ev = replace(cfg.evaluate, model=result.model_uri, run_id=result.run_id)
    say(f"[4/5] evaluate {ev.model} on split {ev.split!r}")
    result.evaluate = evaluate_stage(spark, ev, tracker)
    say(result.evaluate.summary())
    lap("evaluate")

    reg = replace(cfg.register, run_id=result.run_id)
    if reg.name:
        say(f"[5/5] register run {reg.run_id} as {reg.name}@{reg.alias}")
        result.register = register_stage(spark, reg, tracker)
        say(result.register.summary())
        say(f"serve it with: sparktune serve --model models:/{reg.name}@{reg.alias}")
    else:
        say("[5/5] register: skipped (register.name is empty)")
    lap("register")
    return result


def add_cli(subparsers) -> None:
    from sparktune.cli import stage_parser

    parser = stage_parser(
        subparsers,
        "pipeline",
        help="run ingest, tokenize, train, evaluate and register in one job",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=DEFAULT_PIPELINE_CONFIG, metavar="FILE",
                        help=f"pipeline YAML (default: {DEFAULT_PIPELINE_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. evaluate.limit=500 train.train.max_steps=20")
    parser.epilog = config_keys_help()
    parser.set_defaults(func=_run_cli)


def config_keys_help() -> str:
    """The sections' keys with their defaults and help (the stages' settings docstrings)."""
    import dataclasses
    import textwrap

    from sparktune.settings import cli_default, field_help, show_default

    lines = ["config keys (train: a whole training config, see sparktune train --help and jobs/configs/):"]
    for name, cls in PIPELINE_SECTIONS.items():
        if cls is TrainConfig:
            continue
        docs = field_help(cls)
        for f in dataclasses.fields(cls):
            key = f"{name}.{f.name}"
            if key in CONFIG_LINKS or key in RUN_LINKS:
                wired = CONFIG_LINKS.get(key) or RUN_LINKS[key]
                lines.append(f"  {key}: set by the pipeline ({wired})")
                continue
            default = cli_default(f)
            shown = "required" if default is dataclasses.MISSING else f"default: {show_default(default) or 'empty'}"
            lines += textwrap.wrap(f"{key} ({shown}): {docs.get(f.name, '')}", 100, initial_indent="  ",
                                   subsequent_indent="      ")
    return "\n".join(lines)


def _run_cli(args, ctx) -> PipelineResult:
    cfg = load_pipeline_config(args.config, args.overrides)
    tracker = ctx.tracker(cfg.train.mlflow.experiment) if (args.tracking_uri or args.experiment) else None
    # The stages' own summaries go to stderr with --json, so stdout holds one JSON object.
    say = print if not args.json else _print_err
    started = time.perf_counter()
    spark = ctx.spark()
    spark_start = time.perf_counter() - started
    result = run_pipeline(cfg, spark=spark, tracker=tracker, say=say)
    result.overhead = {"spark_start": spark_start, **result.overhead}  # started before the pipeline's clock
    return result


def _print_err(text: str) -> None:
    import sys

    print(text, file=sys.stderr)
