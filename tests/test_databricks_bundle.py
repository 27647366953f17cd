"""The Databricks Asset Bundle (databricks.yml + resources/*.yml), checked without a workspace.

Resources are loaded with Databricks' own published models (the ``databricks-bundles``
package, the classes the Databricks CLI's Python support loads YAML resources into; they
reject unknown fields and wrong types). When a ``databricks`` binary is on PATH, the real CLI's
``bundle validate --strict`` runs on every target against a local fake of the few workspace
endpoints validate calls (docs/databricks.md says how to get the binary); without one those
tests are skipped. On top of that, what only sparktune knows: every task's file exists, every
parameter a task passes is accepted by that stage's parser (``sparktune.cli.build_parser()`` as
it is at test time) and the train overrides by the train config loader, each task reads the
table the previous one wrote, and the deployment is laid out as a Databricks user needs it
(targets with their own state, CPU work on CPU clusters, names unique per developer).
"""

from __future__ import annotations

import copy
import glob
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from sparktune.databricks import TASK_VALUE_KEYS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = ("ingest", "tokenize", "train", "evaluate", "register")
JOBS = ("sparktune_pipeline", "sparktune_llm")
TARGETS = ("dev", "serve")
# The configs of the multi-GPU job (issue 20's 7-8B FSDP and QLoRA configs); the first is the default.
LLM_CONFIGS = ("llm7b_fsdp_gpu", "llm7b_qlora_gpu")
_VAR = re.compile(r"\$\{var\.([A-Za-z0-9_]+)\}")
_DYNAMIC = re.compile(r"\{\{([^}]+)\}\}")
_UC_TABLE = re.compile(r"\w+\.\w+\.\w+")


def _user_refs(user_name: str, short_name: str) -> dict:
    """What the Databricks CLI fills in at deploy time, for parsing parameters here."""
    return {
        "${workspace.file_path}": ROOT,
        "${workspace.current_user.userName}": user_name,
        "${workspace.current_user.short_name}": short_name,
        "${bundle.name}": "sparktune",
    }


_SAMPLE_REFS = _user_refs("analyst.one@example.com", "analyst_one")
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


def load_bundle(target: str = "dev") -> tuple[dict, dict]:
    """The bundle as the CLI sees it for ``target`` (includes merged, the target's resources and
    variable values applied), and which file defined each resource."""
    root = _read_yaml(os.path.join(ROOT, "databricks.yml"))
    sources: dict = {}
    for pattern in root.get("include", []):
        files = sorted(glob.glob(os.path.join(ROOT, pattern)))
        assert files, f"include pattern {pattern!r} matches no file"
        for path in files:
            doc = _read_yaml(path)
            assert set(doc) <= {"resources", "variables", "targets"}, f"{path}: unexpected top-level keys {set(doc)}"
            resource_sets = [doc.get("resources", {})]
            resource_sets += [spec.get("resources", {}) for spec in doc.get("targets", {}).values()]
            for resources in resource_sets:
                for kind, items in resources.items():
                    for name in items:
                        sources[(kind, name)] = path
            _merge(root, {key: doc[key] for key in ("resources", "variables", "targets") if key in doc})
    root.setdefault("resources", {})
    spec = root["targets"][target]
    _merge(root["resources"], spec.get("resources", {}))
    for name, value in spec.get("variables", {}).items():
        root["variables"][name]["default"] = value
    return root, sources


def _values(bundle: dict, **overrides) -> dict:
    """Variable values: the target's (or the defaults), then ``--var``-like overrides."""
    return {**{name: str(spec["default"]) for name, spec in bundle["variables"].items()}, **overrides}


def _resolve(value: str, values: dict, refs: dict = _SAMPLE_REFS) -> str:
    """A string as a run would see it: variables and ``${workspace.*}`` references substituted
    (variables may hold references), ``{{...}}`` dynamic values at sample values."""
    for _ in range(5):
        previous = value
        for ref, sample in refs.items():
            value = value.replace(ref, sample)
        value = _VAR.sub(lambda m: values[m.group(1)], value)
        if value == previous:
            break
    assert "${" not in value, f"unresolved bundle reference in {value!r}"
    return _DYNAMIC.sub(lambda m: _SAMPLE_DYNAMIC[m.group(1).strip()], value)


def _resource_models():
    from databricks.bundles.jobs import Job
    from databricks.bundles.model_serving_endpoints import ModelServingEndpoint
    from databricks.bundles.volumes import Volume

    return {"jobs": Job, "volumes": Volume, "model_serving_endpoints": ModelServingEndpoint}


def _job(job_key: str = "sparktune_pipeline"):
    bundle, sources = load_bundle("dev")
    return bundle["resources"]["jobs"][job_key], sources[("jobs", job_key)]


def _tasks(job_key: str = "sparktune_pipeline") -> dict:
    return {t["task_key"]: t for t in _job(job_key)[0]["tasks"]}


def _clusters(job_key: str) -> dict:
    return {c["job_cluster_key"]: c["new_cluster"] for c in _job(job_key)[0]["job_clusters"]}


def _raw_argv(task: dict) -> list:
    """``sparktune`` argv a task runs, unresolved: a script task's parameters, or the run_stage
    notebook's ``stage`` and ``args`` (a JSON list) widgets."""
    if "spark_python_task" in task:
        return [str(p) for p in task["spark_python_task"]["parameters"]]
    widgets = task["notebook_task"]["base_parameters"]
    assert {"stage", "args"} <= set(widgets) <= {"stage", "args", "config_section"}, \
        f"task {task['task_key']}: run_stage takes stage, args and config_section"
    args = json.loads(widgets["args"])
    assert isinstance(args, list) and all(isinstance(a, str) for a in args)
    return [widgets["stage"], *args]


def _task_file(task: dict) -> str:
    if "spark_python_task" in task:
        return task["spark_python_task"]["python_file"]
    return task["notebook_task"]["notebook_path"]


def _params(task_key: str, job_key: str = "sparktune_pipeline", *, refs: dict = _SAMPLE_REFS, **overrides) -> list:
    bundle, _ = load_bundle("dev")
    values = _values(bundle, **overrides)
    return [_resolve(p, values, refs) for p in _raw_argv(_tasks(job_key)[task_key])]


def _flag(params: list, flag: str) -> str:
    return params[params.index(flag) + 1]


def _train_overrides(params: list) -> dict:
    assert params[1] == "--config"
    return dict(p.split("=", 1) for p in params[3:])


def _load_train(params: list, task: dict):
    """The train config a train task runs with, as notebooks/run_stage.py hands it to the stage:
    the ``--config`` file, or its ``config_section`` when that widget is set."""
    from sparktune.train.config import load_train_config

    section = task.get("notebook_task", {}).get("base_parameters", {}).get("config_section")
    if not section:
        return load_train_config(params[2], list(params[3:]))
    return load_train_config(None, list(params[3:]), data=_read_yaml(params[2])[section])


def _missing_llm_config(params: list) -> str | None:
    """The multi-GPU job's config file when it is not in this checkout (issue 20 adds them)."""
    path = params[2]
    return path if os.path.basename(path)[: -len(".yaml")] in LLM_CONFIGS and not os.path.isfile(path) else None


# --- Databricks' resource models ----------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_resource_loads_into_databricks_bundles_models(target):
    bundle, _ = load_bundle(target)
    models = _resource_models()
    assert bundle["resources"], f"target {target} deploys nothing"
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


# --- layout: targets, clusters, artifact, sync, names -------------------------------------------


def test_top_level_keys_and_variables():
    bundle, _ = load_bundle()
    assert set(bundle) <= {"bundle", "include", "sync", "artifacts", "variables", "targets", "resources", "workspace"}
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
    assert int(defaults["llm_num_processes"]) == int(defaults["llm_num_workers"]) * int(defaults["llm_gpus_per_node"])
    targets = bundle["targets"]
    assert [t for t, spec in targets.items() if spec.get("default")] == ["dev"]
    assert set(targets) == set(TARGETS)


def test_serve_is_a_deployment_of_its_own():
    """`deploy -t serve` then a plain `deploy` must not delete the endpoint: each target keeps its own
    deployment state (under its root_path), and each deploys only its own resources."""
    dev, _ = load_bundle("dev")
    serve, _ = load_bundle("serve")
    paths = {t: _resolve(load_bundle(t)[0]["targets"][t]["workspace"]["root_path"], {}) for t in TARGETS}
    assert len(set(paths.values())) == len(TARGETS), f"targets share a root_path (and so deployment state): {paths}"
    assert set(serve["resources"]) == {"model_serving_endpoints"}, "serve deploys the endpoint and nothing else"
    assert set(dev["resources"]) == {"jobs", "volumes"}, "an endpoint needs a registered version: not in dev"
    assert set(dev["resources"]["jobs"]) == set(JOBS)


def test_serving_endpoint_serves_the_registered_model():
    serve, _ = load_bundle("serve")
    [endpoint] = serve["resources"]["model_serving_endpoints"].values()
    [entity] = endpoint["config"]["served_entities"]
    register = _params("register")
    assert _resolve(entity["entity_name"], _values(serve)) == _flag(register, "--name")
    assert entity["entity_version"] == "${var.model_version}"


def test_artifact_build_names_no_bare_python():
    """``python`` alone fails where only ``python3`` exists (most Linux and macOS machines)."""
    bundle, _ = load_bundle()
    [artifact] = bundle["artifacts"].values()
    alternatives = [a.split() for a in artifact["build"].split("||")]
    assert alternatives[0][0] == "python3", f"the build must try python3 first: {artifact['build']!r}"
    assert all(a[1:] == alternatives[0][1:] for a in alternatives), "every alternative must run the same build"


@pytest.mark.parametrize("interpreter", ["python3", "python"])
def test_artifact_build_runs_with_only_one_python_name(interpreter, tmp_path):
    """The build command, run as the CLI runs it (``sh -ec``) on a PATH that has only ``python3``
    (Linux, macOS) or only ``python`` (a Windows venv), builds the wheel the tasks install."""
    bundle, _ = load_bundle()
    [artifact] = bundle["artifacts"].values()
    shims = tmp_path / "bin"
    shims.mkdir()
    shim = shims / interpreter
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    work = tmp_path / "src"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "tests", "bench", "data", "out", "dist",
                                                             "build", ".databricks", "*.egg-info", "__pycache__"))
    env = {**os.environ, "PATH": str(shims), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(["/bin/sh", "-ec", artifact["build"]], cwd=work / artifact["path"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    wheels = glob.glob(str(work / artifact["path"] / artifact["files"][0]["source"]))
    assert len(wheels) == 1, f"{artifact['files'][0]['source']} matched {wheels}"


@pytest.mark.parametrize("job_key", JOBS)
def test_job_clusters_and_wheel_library(job_key):
    bundle, _ = load_bundle()
    job, job_file = _job(job_key)
    values = _values(bundle)
    gpu = _clusters(job_key)["gpu"]
    assert "gpu-ml" in _resolve(gpu["spark_version"], values)
    assert gpu["spark_conf"]["spark.task.resource.gpu.amount"] == "1"
    assert int(_resolve(gpu["spark_conf"]["spark.executor.resource.gpu.amount"], values)) >= 1
    [artifact] = bundle["artifacts"].values()
    wheel_glob = os.path.normpath(os.path.join(ROOT, artifact["path"], artifact["files"][0]["source"]))
    for task in job["tasks"]:
        [library] = task["libraries"]
        # The library each task installs is the file the artifact build makes.
        assert os.path.normpath(os.path.join(os.path.dirname(job_file), library["whl"])) == wheel_glob


# Stages whose Spark work needs no GPU. The pipeline's MiniLM scores on CPUs; a 7-8B model cannot.
_CPU_TASKS = {"sparktune_pipeline": ("ingest", "tokenize", "evaluate", "register"),
              "sparktune_llm": ("ingest", "tokenize", "register")}


@pytest.mark.parametrize("job_key", JOBS)
def test_cpu_stages_run_on_a_cpu_cluster(job_key):
    """A GPU cluster set up for TorchDistributor (``spark.task.resource.gpu.amount: 1``) runs one
    task per GPU in every stage; ingest and tokenize belong on a CPU cluster, a task per core."""
    bundle, _ = load_bundle()
    values = _values(bundle)
    clusters = _clusters(job_key)
    for key, task in _tasks(job_key).items():
        cluster = clusters[task["job_cluster_key"]]
        runtime = _resolve(cluster["spark_version"], values)
        gpu_conf = {k: v for k, v in cluster.get("spark_conf", {}).items() if ".resource.gpu." in k}
        if key in _CPU_TASKS[job_key]:
            assert "-cpu-ml-" in runtime and not gpu_conf, f"{job_key}.{key} runs on {runtime} with {gpu_conf}"
            assert _resolve(cluster["node_type_id"], values) != _resolve(clusters["gpu"]["node_type_id"], values)
        else:
            assert "-gpu-ml-" in runtime and gpu_conf, f"{job_key}.{key} needs the GPU cluster"
    assert _tasks(job_key)["train"]["job_cluster_key"] == "gpu"


def test_sync_uploads_the_jobs_not_the_tests():
    import pathspec

    bundle, _ = load_bundle()
    excluded = pathspec.GitIgnoreSpec.from_lines(bundle.get("sync", {}).get("exclude", []))
    # What the CLI syncs before its excludes: the files git does not ignore, tracked or not.
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    uploaded = {path for path in tracked if not excluded.match_file(path)}
    leaked = [p for p in uploaded if p.startswith(("tests/", "bench/", ".ci/"))]
    assert not leaked, f"tests, benchmarks and CI are uploaded: {leaked[:5]}"
    assert [p for p in tracked if p.startswith("tests/data/")], "the check above saw no test data"
    assert {"jobs/stage.py", "notebooks/run_stage.py", "jobs/configs/imdb_gpu.yaml"} <= uploaded


def test_dev_names_are_unique_per_user():
    """Two developers deploying the dev target to one schema get their own volume, tables,
    training outputs and registered models: every Unity Catalog name differs between them."""
    dev, _ = load_bundle("dev")
    serve, _ = load_bundle("serve")
    users = (_user_refs("alice@example.com", "alice"), _user_refs("bob@example.com", "bob"))

    def names(refs):
        found = {_resolve(dev["resources"]["volumes"]["sparktune_volume"]["name"], _values(dev), refs)}
        for job_key in JOBS:
            for cluster in _clusters(job_key).values():
                found.add(_resolve(cluster["spark_env_vars"]["SPARKTUNE_VOLUME"], _values(dev), refs))
            for task_key in PIPELINE:
                params = _params(task_key, job_key, refs=refs)
                found |= {p for p in params if _UC_TABLE.fullmatch(p)}
            found.add(_train_overrides(_params("train", job_key, refs=refs))["output_dir"])
        [endpoint] = serve["resources"]["model_serving_endpoints"].values()
        found.add(_resolve(endpoint["config"]["served_entities"][0]["entity_name"], _values(serve), refs))
        return found

    alice, bob = names(users[0]), names(users[1])
    assert len(alice) >= 10
    assert not alice & bob, f"shared between two developers: {sorted(alice & bob)}"


# --- the jobs' tasks ------------------------------------------------------------------------------


@pytest.mark.parametrize("job_key", JOBS)
def test_tasks_run_the_pipeline_in_order(job_key):
    tasks = _tasks(job_key)
    assert set(tasks) == set(PIPELINE)
    for previous, task_key in itertools.pairwise(PIPELINE):
        assert [d["task_key"] for d in tasks[task_key]["depends_on"]] == [previous]
    assert "depends_on" not in tasks["ingest"]


@pytest.mark.parametrize("job_key", JOBS)
def test_every_task_file_exists(job_key):
    job, job_file = _job(job_key)
    for task in job["tasks"]:
        relative = _task_file(task)
        path = os.path.normpath(os.path.join(os.path.dirname(job_file), relative))
        assert os.path.isfile(path), f"task {task['task_key']}: {relative} -> {path} does not exist"
        assert path.startswith(ROOT + os.sep), f"task {task['task_key']}: {relative} is outside the bundle"
        if "notebook_task" in task:  # deployed as a notebook only in Databricks source format
            with open(path, encoding="utf-8") as handle:
                assert handle.readline() == "# Databricks notebook source\n", path
    for key in PIPELINE:
        params = _params(key, job_key)
        for param in params:
            if param.startswith(ROOT) and param != _missing_llm_config(params):
                assert os.path.isfile(param), f"task {key}: {param} does not exist in the repository"


@pytest.mark.parametrize("job_key", JOBS)
@pytest.mark.parametrize("task_key", PIPELINE)
def test_every_parameter_is_one_the_stage_accepts(job_key, task_key, capsys):
    from sparktune.cli import build_parser

    params = _params(task_key, job_key)
    assert params[0] == task_key, f"task {task_key} runs stage {params[0]!r}"
    try:
        args = build_parser().parse_args(params)
    except SystemExit:
        pytest.fail(f"task {task_key}: `sparktune {' '.join(params)}` is refused: {capsys.readouterr().err}")
    assert args.command == task_key
    if task_key == "train":
        if _missing_llm_config(params):
            pytest.skip(f"{_missing_llm_config(params)} is not in this checkout (issue 20's 7-8B configs)")
        cfg = _load_train(params, _tasks(job_key)[task_key])  # unknown or invalid keys raise ConfigError
        assert cfg.distributor.local_mode is False and cfg.distributor.use_gpu is True
        assert cfg.mlflow.tracking_uri == "databricks"
        assert cfg.output_dir.startswith("/Volumes/")


def test_gpu_job_trains_with_its_gpu_config_and_the_tokenized_length():
    """Not the laptop config: the whole train split, a real evaluation set, the workers' GPUs; and
    ``--var max_length`` reaches train's ``data.max_length`` as well as tokenize's ``--max-length``."""
    from sparktune.train.config import load_train_config

    tokenize, train = _params("tokenize", max_length="384"), _params("train", max_length="384")
    assert os.path.basename(train[2]) == "imdb_gpu.yaml", f"the GPU job trains with {train[2]}"
    cfg = load_train_config(train[2], list(train[3:]))
    assert cfg.data.train_limit is None, "the GPU job trains on the whole train split"
    assert cfg.data.eval_limit is None or cfg.data.eval_limit >= 1000
    assert cfg.distributor.use_gpu is True and cfg.distributor.local_mode is False
    assert _flag(tokenize, "--max-length") == "384"
    assert cfg.data.max_length == 384, "--var max_length did not reach train's data.max_length"


def test_llm_job_picks_its_config_by_variable_and_shares_its_length():
    bundle, _ = load_bundle()
    assert bundle["variables"]["llm_config"]["default"] == LLM_CONFIGS[0]
    raw_train = _raw_argv(_tasks("sparktune_llm")["train"])
    assert raw_train[2] == "${workspace.file_path}/jobs/configs/${var.llm_config}.yaml"
    assert "data.max_length=${var.llm_max_length}" in raw_train
    raw_tokenize = _raw_argv(_tasks("sparktune_llm")["tokenize"])
    assert _flag(raw_tokenize, "--max-length") == "${var.llm_max_length}"
    assert _flag(raw_tokenize, "--task") == "instruction"
    assert int(bundle["variables"]["llm_gpus_per_node"]["default"]) > 1, "the 7-8B job is for multi-GPU nodes"
    for name in LLM_CONFIGS:
        train = _params("train", "sparktune_llm", llm_config=name, llm_max_length="1024")
        if _missing_llm_config(train):
            continue  # checked where issue 20's configs are in the checkout
        cfg = _load_train(train, _tasks("sparktune_llm")["train"])
        assert cfg.data.max_length == 1024 and cfg.model.task == "instruction"
        assert cfg.distributor.num_processes == int(bundle["variables"]["llm_num_processes"]["default"])


@pytest.mark.parametrize("job_key", JOBS)
def test_each_task_reads_what_the_previous_one_wrote(job_key):
    ingest, tokenize, train, evaluate, register = (_params(k, job_key) for k in PIPELINE)
    assert _flag(tokenize, "--input") == _flag(ingest, "--output")
    overrides = _train_overrides(train)
    assert overrides["data.table"] == _flag(tokenize, "--output")
    assert overrides["model.name"] == _flag(tokenize, "--tokenizer")
    assert _flag(evaluate, "--table") == _flag(tokenize, "--output")
    assert _flag(evaluate, "--model") == _SAMPLE_DYNAMIC["tasks.train.values.model_uri"]
    assert _flag(register, "--run-id") == _SAMPLE_DYNAMIC["tasks.train.values.run_id"]
    # Tables are Unity Catalog names (catalog.schema.table), outputs on the bundle's Volume.
    for table in (_flag(ingest, "--output"), _flag(tokenize, "--output"), _flag(evaluate, "--predictions")):
        assert _UC_TABLE.fullmatch(table), table
    bundle, _ = load_bundle()
    values = _values(bundle)
    volume = bundle["resources"]["volumes"]["sparktune_volume"]
    volume_root = "/Volumes/{}/{}/{}/".format(*(_resolve(volume[k], values)
                                                for k in ("catalog_name", "schema_name", "name")))
    assert overrides["output_dir"].startswith(volume_root)
    for cluster in _clusters(job_key).values():
        assert _resolve(cluster["spark_env_vars"]["SPARKTUNE_VOLUME"], values) == ".".join(volume_root.split("/")[2:5])


def test_the_two_jobs_write_different_tables():
    written = {job_key: {_flag(_params(k, job_key), "--output") for k in ("ingest", "tokenize")}
               | {_flag(_params("evaluate", job_key), "--predictions")} for job_key in JOBS}
    assert not written["sparktune_pipeline"] & written["sparktune_llm"]
    registered = {_flag(_params("register", job_key), "--name") for job_key in JOBS}
    assert len(registered) == len(JOBS)


@pytest.mark.parametrize("job_key", JOBS)
def test_task_value_references_point_upstream_at_published_keys(job_key):
    tasks = _tasks(job_key)
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


# --- the real Databricks CLI ----------------------------------------------------------------------

DATABRICKS = shutil.which("databricks")
needs_cli = pytest.mark.skipif(DATABRICKS is None, reason="no `databricks` binary on PATH (docs/databricks.md: "
                                                          "'Checking the bundle with the real CLI')")
_ME = {"id": "7", "userName": "analyst.one@example.com", "displayName": "Analyst One", "active": True}


class _Workspace(BaseHTTPRequestHandler):
    """The workspace endpoints ``bundle validate`` calls: who am I, and the bundle's file folder
    (exists, or is created). Anything else answers 404, so a validate that needs more fails."""

    calls: list = []

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path = self.path.split("?", 1)[0]
        self.calls.append(f"{self.command} {path}")
        if path == "/api/2.0/preview/scim/v2/Me":
            status, body = 200, _ME
        elif path == "/api/2.0/workspace/get-status":
            status, body = 200, {"object_type": "DIRECTORY", "object_id": 1, "path": "/Workspace"}
        elif path == "/api/2.0/workspace/mkdirs":
            status, body = 200, {}
        else:
            status, body = 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"{path}: not in this fake"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def workspace():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Workspace)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _validate(bundle_root, target: str, host: str, home) -> subprocess.CompletedProcess:
    assert DATABRICKS is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABRICKS_", "BUNDLE_VAR_"))}
    env.update(HOME=str(home), DATABRICKS_HOST=host, DATABRICKS_TOKEN="dapi-not-a-real-token",
               DATABRICKS_CLI_UPSTREAM="sparktune-tests")
    return subprocess.run([DATABRICKS, "bundle", "validate", "--strict", "-t", target, "-o", "json"],
                          cwd=bundle_root, env=env, capture_output=True, text=True, timeout=300)


@needs_cli
@pytest.mark.parametrize("target", TARGETS)
def test_databricks_bundle_validate_strict(target, workspace, tmp_path):
    done = _validate(ROOT, target, workspace, tmp_path)
    assert done.returncode == 0, f"databricks bundle validate --strict -t {target}:\n{done.stderr}"
    config = json.loads(done.stdout)
    resources = config["resources"]
    root_path = config["workspace"]["root_path"]
    assert root_path == f"/Workspace/Users/{_ME['userName']}/.bundle/sparktune/{target}"
    if target == "dev":
        assert set(resources) == {"jobs", "volumes"}
        assert resources["volumes"]["sparktune_volume"]["name"] == "dev_analyst_one_sparktune"
        assert {j["name"] for j in resources["jobs"].values()} == {
            "[dev analyst_one] sparktune-pipeline", "[dev analyst_one] sparktune-llm"}
        for job in resources["jobs"].values():
            for task in job["tasks"]:
                path = task.get("spark_python_task", {}).get("python_file") or task["notebook_task"]["notebook_path"]
                assert path.startswith(root_path + "/files/"), path
    else:
        assert set(resources) == {"model_serving_endpoints"}
        [endpoint] = resources["model_serving_endpoints"].values()
        # What docs/databricks.md tells users to look for in the Serving UI.
        assert endpoint["name"] == "dev_analyst_one_sparktune-imdb_sentiment"
        [entity] = endpoint["config"]["served_entities"]
        assert entity["entity_name"] == "main.sparktune.dev_analyst_one_imdb_sentiment"
    assert config["sync"]["exclude"] == load_bundle(target)[0]["sync"]["exclude"]


@needs_cli
def test_validate_strict_refuses_a_broken_bundle(workspace, tmp_path):
    """The CLI check can fail: the same bundle with one misspelt task field does not validate."""
    copy_root = tmp_path / "bundle"
    copy_root.mkdir()
    (tmp_path / "home").mkdir()
    for name in ("databricks.yml", "resources", "jobs", "notebooks"):
        source = os.path.join(ROOT, name)
        (shutil.copytree if os.path.isdir(source) else shutil.copy)(source, copy_root / name)
    pipeline = copy_root / "resources" / "sparktune_pipeline.yml"
    pipeline.write_text(pipeline.read_text().replace("spark_python_task:", "spark_python_tsk:", 1))
    done = _validate(copy_root, "dev", workspace, tmp_path / "home")
    assert done.returncode != 0
    assert "spark_python_tsk" in done.stderr
