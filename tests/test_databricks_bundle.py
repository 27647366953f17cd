"""The Databricks Asset Bundle (databricks.yml + resources/*.yml), checked without a workspace.

Resources are loaded with Databricks' own published models (the ``databricks-bundles``
package, the classes the Databricks CLI's Python support loads YAML resources into; they
reject unknown fields and wrong types). On top of that, what only sparktune knows: every task's
file exists, every parameter a task passes is accepted by that stage's parser
(``sparktune.cli.build_parser()`` as it is at test time) and the train overrides by the train
config loader, and each task reads the table the previous one wrote.
"""

from __future__ import annotations

import copy
import glob
import itertools
import json
import os
import re

import pytest
import yaml

from sparktune.databricks import TASK_VALUE_KEYS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = ("ingest", "tokenize", "train", "evaluate", "register")
_VAR = re.compile(r"\$\{var\.([A-Za-z0-9_]+)\}")
_DYNAMIC = re.compile(r"\{\{([^}]+)\}\}")
# What the Databricks CLI and Jobs fill in at deploy/run time, for parsing parameters here.
_SAMPLE_REFS = {
    "${workspace.file_path}": ROOT,
    "${workspace.current_user.userName}": "analyst@example.com",
    "${bundle.name}": "sparktune",
    "${bundle.target}": "dev",
}
_SAMPLE_DYNAMIC = {
    "job.run_id": "123456",
    "job.id": "42",
    "tasks.train.values.model_uri": "runs:/0123456789abcdef/model",
    "tasks.train.values.run_id": "0123456789abcdef",
}


def _read_yaml(path):
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _merge(into: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def load_bundle(target: str | None = None) -> tuple[dict, dict]:
    """The bundle as the CLI sees it for ``target`` (includes merged), and which file defined each resource."""
    root = _read_yaml(os.path.join(ROOT, "databricks.yml"))
    sources: dict = {}
    for pattern in root.get("include", []):
        files = sorted(glob.glob(os.path.join(ROOT, pattern)))
        assert files, f"include pattern {pattern!r} matches no file"
        for path in files:
            doc = _read_yaml(path)
            assert set(doc) <= {"resources", "variables", "targets"}, f"{path}: unexpected top-level keys {set(doc)}"
            for kind, items in doc.get("resources", {}).items():
                for name in items:
                    sources[(kind, name)] = path
            _merge(root, {"resources": doc.get("resources", {})})
    if target:
        for kind, items in root["targets"][target].get("resources", {}).items():
            for name in items:
                sources[(kind, name)] = os.path.join(ROOT, "databricks.yml")
        _merge(root, {"resources": root["targets"][target].get("resources", {})})
    return root, sources


def _resource_models():
    from databricks.bundles.jobs import Job
    from databricks.bundles.model_serving_endpoints import ModelServingEndpoint
    from databricks.bundles.volumes import Volume

    return {"jobs": Job, "volumes": Volume, "model_serving_endpoints": ModelServingEndpoint}


def _job():
    bundle, sources = load_bundle()
    return bundle["resources"]["jobs"]["sparktune_pipeline"], sources[("jobs", "sparktune_pipeline")]


def _tasks() -> dict:
    return {t["task_key"]: t for t in _job()[0]["tasks"]}


def _resolve(value: str, variables: dict) -> str:
    """A parameter as a run would see it: variables at their defaults, references at sample values."""
    for ref, sample in _SAMPLE_REFS.items():
        value = value.replace(ref, sample)
    value = _VAR.sub(lambda m: str(variables[m.group(1)]["default"]), value)
    assert "${" not in value, f"unresolved bundle reference in {value!r}"
    return _DYNAMIC.sub(lambda m: _SAMPLE_DYNAMIC[m.group(1).strip()], value)


def _raw_argv(task: dict) -> list:
    """``sparktune`` argv a task runs, unresolved: a script task's parameters, or the run_stage
    notebook's ``stage`` and ``args`` (a JSON list) widgets."""
    if "spark_python_task" in task:
        return [str(p) for p in task["spark_python_task"]["parameters"]]
    widgets = task["notebook_task"]["base_parameters"]
    assert set(widgets) == {"stage", "args"}, f"task {task['task_key']}: run_stage takes stage and args"
    args = json.loads(widgets["args"])
    assert isinstance(args, list) and all(isinstance(a, str) for a in args)
    return [widgets["stage"], *args]


def _task_file(task: dict) -> str:
    if "spark_python_task" in task:
        return task["spark_python_task"]["python_file"]
    return task["notebook_task"]["notebook_path"]


def _params(task_key: str) -> list:
    bundle, _ = load_bundle()
    return [_resolve(p, bundle["variables"]) for p in _raw_argv(_tasks()[task_key])]


def _flag(params: list, flag: str) -> str:
    return params[params.index(flag) + 1]


@pytest.mark.parametrize("target", [None, "dev", "serve"])
def test_every_resource_loads_into_databricks_bundles_models(target):
    bundle, _ = load_bundle(target)
    models = _resource_models()
    assert set(bundle["resources"]) <= set(models), f"resource kinds without a model here: {set(bundle['resources'])}"
    for kind, items in bundle["resources"].items():
        for name, body in items.items():
            resource = models[kind].from_dict(copy.deepcopy(body))
            assert resource.as_dict(), f"{kind}.{name} loaded empty"


def test_the_models_reject_what_databricks_would_reject():
    """The validator is strict: a misspelt field or a wrongly typed value fails, so the test above means something."""
    from databricks.bundles.jobs import Job

    job, _ = _job()
    typo = copy.deepcopy(job)
    typo["tasks"][0]["spark_python_tsk"] = typo["tasks"][0].pop("spark_python_task")
    with pytest.raises(ValueError, match="spark_python_tsk"):
        Job.from_dict(typo)
    wrong_type = copy.deepcopy(job)
    wrong_type["job_clusters"][0]["new_cluster"]["num_workers"] = "two"
    with pytest.raises(ValueError):
        Job.from_dict(wrong_type)


def test_top_level_keys_and_variables():
    bundle, _ = load_bundle()
    assert set(bundle) <= {"bundle", "include", "artifacts", "variables", "targets", "resources", "workspace"}
    declared = set(bundle["variables"])
    text = ""
    for path in [os.path.join(ROOT, "databricks.yml"), *glob.glob(os.path.join(ROOT, "resources", "*.yml"))]:
        with open(path, encoding="utf-8") as handle:
            text += handle.read()
    used = set(_VAR.findall(text))
    assert used <= declared, f"undeclared variables: {used - declared}"
    assert declared <= used, f"variables nothing uses: {declared - used}"
    for name, spec in bundle["variables"].items():
        assert spec.get("description") and "default" in spec, f"variable {name}: needs a description and a default"
    defaults = {k: v["default"] for k, v in bundle["variables"].items()}
    assert int(defaults["num_processes"]) == int(defaults["num_workers"]) * int(defaults["gpus_per_node"])
    targets = bundle["targets"]
    assert [t for t, spec in targets.items() if spec.get("default")] == ["dev"]


def test_gpu_job_cluster_and_wheel_library():
    bundle, _ = load_bundle()
    job, job_file = _job()
    [cluster] = job["job_clusters"]
    new = cluster["new_cluster"]
    assert new["spark_version"] == "${var.spark_version}"
    assert "gpu-ml" in bundle["variables"]["spark_version"]["default"]
    assert new["node_type_id"] == "${var.node_type_id}"
    assert new["num_workers"] == "${var.num_workers}"
    assert new["spark_conf"]["spark.executor.resource.gpu.amount"] == "${var.gpus_per_node}"
    assert new["spark_conf"]["spark.task.resource.gpu.amount"] == "1"
    [artifact] = bundle["artifacts"].values()
    assert artifact["type"] == "whl"
    wheel_glob = os.path.normpath(os.path.join(ROOT, artifact["path"], artifact["files"][0]["source"]))
    for task in job["tasks"]:
        assert task["job_cluster_key"] == cluster["job_cluster_key"]
        [library] = task["libraries"]
        # The library each task installs is the file the artifact build makes.
        assert os.path.normpath(os.path.join(os.path.dirname(job_file), library["whl"])) == wheel_glob


def test_tasks_run_the_pipeline_in_order():
    tasks = _tasks()
    assert list(tasks) == list(PIPELINE)
    for previous, task_key in itertools.pairwise(PIPELINE):
        assert [d["task_key"] for d in tasks[task_key]["depends_on"]] == [previous]
    assert "depends_on" not in tasks["ingest"]


def test_every_task_file_exists():
    job, job_file = _job()
    for task in job["tasks"]:
        relative = _task_file(task)
        path = os.path.normpath(os.path.join(os.path.dirname(job_file), relative))
        assert os.path.isfile(path), f"task {task['task_key']}: {relative} -> {path} does not exist"
        assert path.startswith(ROOT + os.sep), f"task {task['task_key']}: {relative} is outside the bundle"
        if "notebook_task" in task:  # deployed as a notebook only in Databricks source format
            with open(path, encoding="utf-8") as handle:
                assert handle.readline() == "# Databricks notebook source\n", path
    for key in PIPELINE:
        for param in _params(key):
            if param.startswith(ROOT):
                assert os.path.isfile(param), f"task {key}: {param} does not exist in the repository"


@pytest.mark.parametrize("task_key", PIPELINE)
def test_every_parameter_is_one_the_stage_accepts(task_key, capsys):
    from sparktune.cli import build_parser

    params = _params(task_key)
    assert params[0] == task_key, f"task {task_key} runs stage {params[0]!r}"
    try:
        args = build_parser().parse_args(params)
    except SystemExit:
        pytest.fail(f"task {task_key}: `sparktune {' '.join(params)}` is refused: {capsys.readouterr().err}")
    assert args.command == task_key
    if task_key == "train":
        from sparktune.train.config import load_train_config

        cfg = load_train_config(args.config, args.overrides)  # unknown or invalid keys raise ConfigError
        assert cfg.distributor.local_mode is False and cfg.distributor.use_gpu is True
        assert cfg.mlflow.tracking_uri == "databricks"
        assert cfg.output_dir.startswith("/Volumes/")


def test_each_task_reads_what_the_previous_one_wrote():
    ingest, tokenize, train, evaluate, register = (_params(k) for k in PIPELINE)
    assert _flag(tokenize, "--input") == _flag(ingest, "--output")
    overrides = dict(p.split("=", 1) for p in train[3:])
    assert train[1] == "--config"
    assert overrides["data.table"] == _flag(tokenize, "--output")
    assert _flag(evaluate, "--table") == _flag(tokenize, "--output")
    assert _flag(evaluate, "--model") == _SAMPLE_DYNAMIC["tasks.train.values.model_uri"]
    assert _flag(register, "--run-id") == _SAMPLE_DYNAMIC["tasks.train.values.run_id"]
    # Tables are Unity Catalog names (catalog.schema.table), outputs on the bundle's Volume.
    for table in (_flag(ingest, "--output"), _flag(tokenize, "--output"), _flag(evaluate, "--predictions")):
        assert re.fullmatch(r"\w+\.\w+\.\w+", table), table
    bundle, _ = load_bundle()
    volume = bundle["resources"]["volumes"]["sparktune_volume"]
    defaults = {k: v["default"] for k, v in bundle["variables"].items()}
    volume_root = f"/Volumes/{defaults['catalog']}/{defaults['schema']}/{defaults['volume']}/"
    assert overrides["output_dir"].startswith(volume_root)
    assert volume["name"] == "${var.volume}" and volume["catalog_name"] == "${var.catalog}"


def test_task_value_references_point_upstream_at_published_keys():
    tasks = _tasks()
    for key, task in tasks.items():
        upstream: set = set()
        frontier = [d["task_key"] for d in task.get("depends_on", [])]
        while frontier:
            name = frontier.pop()
            upstream.add(name)
            frontier += [d["task_key"] for d in tasks[name].get("depends_on", [])]
        for param in _raw_argv(task):
            for ref in _DYNAMIC.findall(param):
                parts = ref.strip().split(".")
                if parts[0] != "tasks":
                    continue
                assert parts[1] in upstream, f"task {key} reads {ref} from a task that is not upstream"
                assert parts[2] == "values" and parts[3] in TASK_VALUE_KEYS, f"task {key}: {ref} is not published"
                # Databricks documents dbutils.jobs.taskValues.set for notebooks only.
                assert "notebook_task" in tasks[parts[1]], f"task {parts[1]} publishes values but is not a notebook"


def test_serving_endpoint_serves_the_registered_model():
    bundle, _ = load_bundle("serve")
    [endpoint] = bundle["resources"]["model_serving_endpoints"].values()
    [entity] = endpoint["config"]["served_entities"]
    register = _raw_argv(_tasks()["register"])
    assert entity["entity_name"] == register[register.index("--name") + 1]
    assert entity["entity_version"] == "${var.model_version}"
    dev, _ = load_bundle("dev")
    assert "model_serving_endpoints" not in dev["resources"], "an endpoint needs a registered version: not in dev"
    assert bundle["targets"]["serve"]["workspace"]["root_path"] == bundle["targets"]["dev"]["workspace"]["root_path"]
