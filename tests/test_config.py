"""The typed config loader: YAML plus dotted overrides, every problem reported at once."""

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from sparktune.config import flatten_config, load_config, parse_overrides, raise_if, require
from sparktune.errors import ConfigError
from sparktune.tables import parse_table_ref


@dataclass
class Optim:
    lr: float = 1e-4
    """Peak learning rate."""
    steps: int = 10
    """Optimizer steps."""

    def __post_init__(self):
        problems = []
        require(problems, self.lr > 0, "lr", f"must be > 0, found {self.lr}")
        raise_if(problems)


@dataclass
class Job:
    name: str
    """Required: no default."""
    task: Literal["classification", "causal-lm"] = "classification"
    fp16: bool = False
    tags: list[str] = field(default_factory=list)
    # typing.Optional on purpose: covers the loader's typing.Union branch (X | None is types.UnionType)
    note: Optional[str] = None  # noqa: UP045
    optim: Optim = field(default_factory=Optim)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: imdb\noptim:\n  lr: 2e-5\n  steps: 3\n")
    cfg = load_config(Job, path, ["optim.steps=7", "fp16=true", "tags=a,b", "task=causal-lm"])
    assert cfg.optim.lr == 2e-5 and cfg.optim.steps == 7
    assert cfg.fp16 is True and cfg.tags == ["a", "b"] and cfg.task == "causal-lm"
    assert flatten_config(cfg)["optim.lr"] == 2e-5


def test_every_problem_in_one_error(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("optim:\n  lr: -1\n  stepz: 3\nfp16: maybe\n")
    with pytest.raises(ConfigError) as info:
        load_config(Job, path, ["task=regression", "optim.steps=2.5", "colour=red"])
    message = str(info.value)
    for expected in (
        "name: required",
        "optim.stepz: unknown key; did you mean 'optim.steps'",
        "fp16: expected true or false, found 'maybe'",
        "task: expected one of ['classification', 'causal-lm'], found 'regression'",
        "optim.steps: expected an integer, found 2.5",
        "colour: unknown key",
        str(path),
    ):
        assert expected in message, (expected, message)


def test_post_init_checks_are_collected_with_their_section(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lr: must be > 0, found -1\.0"):
        load_config(Job, None, ["name=x", "optim.lr=-1"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["train.max_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Job, tmp_path / "missing.yaml")


def test_table_refs_paths_and_names():
    assert parse_table_ref("./data/raw").is_path
    assert parse_table_ref("/tmp/raw").sql == "delta.`/tmp/raw`"
    assert parse_table_ref("dbfs:/mnt/raw").path == "dbfs:/mnt/raw"
    assert parse_table_ref("main.imdb.raw").sql == "main.imdb.raw"
    assert not parse_table_ref("raw").is_path
    with pytest.raises(Exception, match="neither a path nor a table name"):
        parse_table_ref("a.b.c.d")
