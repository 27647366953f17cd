"""The wheel: installing sparktune must not replace a platform's Spark/Delta/torch/MLflow.

On a Databricks ML runtime those come with the cluster at versions Databricks built and tested
together; `%pip install sparktune` must keep them. The wheel is built with the Asset Bundle's
own artifact command (databricks.yml) and installed into fresh virtual environments (no system
site-packages), one of which already holds a pyspark version outside the local extra's range.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a Databricks ML runtime provides; none may be a plain (non-extra) requirement.
RUNTIME_STACK = {"pyspark", "delta-spark", "torch", "transformers", "tokenizers", "accelerate", "datasets", "mlflow",
                 "mlflow-skinny", "scikit-learn", "matplotlib", "huggingface-hub", "safetensors"}
OTHER_PYSPARK = "4.0.1"  # Databricks Runtime 17.x's Spark; outside the local extra's pyspark>=4.1,<4.2


def _canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _run(cmd, **kwargs):
    # Nothing from this checkout may leak into the venv's imports (tests run with PYTHONPATH set).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, **kwargs)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    """The wheel built by databricks.yml's artifact build command, from a copy of the sources."""
    src = tmp_path_factory.mktemp("src") / "sparktune"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "data", ".sparktune", "dist", "build", "*.egg-info", "__pycache__", "out", "spark-warehouse"))
    with open(os.path.join(ROOT, "databricks.yml"), encoding="utf-8") as handle:
        [artifact] = yaml.safe_load(handle)["artifacts"].values()
    # "python3 -m pip wheel ... || python -m pip wheel ...": the first alternative, with this interpreter.
    build = shlex.split(artifact["build"].split("||")[0])
    assert build[0] in ("python3", "python")
    _run([sys.executable, *build[1:]], cwd=src / artifact["path"], timeout=600)
    built = glob.glob(str(src / artifact["path"] / artifact["files"][0]["source"]))
    assert len(built) == 1, f"the artifact's files pattern matched {built}"
    return built[0]


def _metadata(wheel_path: str) -> tuple[list[Requirement], dict]:
    with zipfile.ZipFile(wheel_path) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    reqs = [Requirement(line.split(":", 1)[1].strip())
            for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    return reqs, {"names": names, "entry_points": entry_points}


def _extra(req: Requirement) -> str | None:
    marker = str(req.marker or "")
    return marker.split("extra ==")[1].strip().strip("\"'") if "extra ==" in marker else None


def _venv(path) -> str:
    """A fresh virtual environment (no system site-packages) with pip; returns its python."""
    _run([sys.executable, "-m", "venv", str(path)], timeout=300)
    python = os.path.join(path, "bin", "python")
    with open(os.path.join(path, "pyvenv.cfg"), encoding="utf-8") as handle:
        assert "include-system-site-packages = false" in handle.read()
    return python


def _dry_run(python: str, target: str, report) -> dict:
    _run([python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), target], timeout=600)
    with open(report, encoding="utf-8") as handle:
        return {_canon(item["metadata"]["name"]): item["metadata"]["version"] for item in json.load(handle)["install"]}


def test_wheel_metadata_keeps_the_runtime_stack_in_extras(wheel):
    reqs, files = _metadata(wheel)
    base = {_canon(r.name) for r in reqs if _extra(r) is None}
    local = {_canon(r.name) for r in reqs if _extra(r) == "local"}
    assert not base & RUNTIME_STACK, f"plain requirements a Databricks runtime provides: {base & RUNTIME_STACK}"
    assert {"pyyaml", "numpy", "pandas", "pyarrow", "deltalake"} <= base
    assert {"pyspark", "delta-spark", "torch", "transformers", "mlflow", "openai"} <= local
    dev = {_canon(r.name) for r in reqs if _extra(r) == "dev"}
    assert {"pytest", "hypothesis", "ruff", "mypy", "databricks-bundles"} <= dev
    assert "sparktune/databricks.py" in files["names"] and "sparktune/ivysettings.xml" in files["names"]
    assert "sparktune = sparktune.cli:main" in files["entry_points"]


def test_the_ranges_admit_the_oldest_stack_ci_runs(wheel):
    """setup.py's ranges cover Databricks Runtime 17.3 LTS ML's versions (what ci/runtime_matrix.sh
    installs) besides today's; only Spark and Delta differ: the runtime brings its own (4.0)."""
    with open(os.path.join(ROOT, "ci", "constraints-dbr-17.3-lts-ml.txt"), encoding="utf-8") as handle:
        pinned = [Requirement(line.strip()) for line in handle if line.strip() and not line.startswith("#")]
    runtime = {_canon(req.name): str(req.specifier).removeprefix("==") for req in pinned}
    reqs, _ = _metadata(wheel)
    checked = []
    for req in reqs:
        name = _canon(req.name)
        if _extra(req) in (None, "local", "databricks") and name in runtime and name not in ("pyspark", "delta-spark"):
            assert req.specifier.contains(runtime[name]), f"{req} excludes the runtime's {name} {runtime[name]}"
            checked.append(name)
    assert {"torch", "transformers", "accelerate", "datasets", "mlflow", "numpy", "pandas", "pyarrow"} <= set(checked)


def test_installing_the_wheel_would_bring_no_runtime_package(wheel, tmp_path):
    """pip's own resolver, in a fresh venv: the plain wheel installs none of the runtime stack."""
    python = _venv(tmp_path / "venv")
    planned = _dry_run(python, wheel, tmp_path / "plain.json")
    assert "sparktune" in planned
    assert not set(planned) & RUNTIME_STACK, f"would install {set(planned) & RUNTIME_STACK}"


@pytest.mark.slow
@pytest.mark.timeout(2400)  # a real pyspark (~450 MB) and sparktune's own requirements into a fresh venv
def test_wheel_install_leaves_an_installed_pyspark_alone(wheel, tmp_path):
    """A real pyspark (Databricks Runtime 17's 4.0) in a fresh venv survives installing sparktune."""
    python = _venv(tmp_path / "venv")
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", f"pyspark=={OTHER_PYSPARK}"], timeout=1200)
    # Contrast: the local extra would replace it (what the old setup.py did to every runtime).
    assert _dry_run(python, wheel + "[local]", tmp_path / "local.json").get("pyspark", "").startswith("4.1.")
    assert "pyspark" not in _dry_run(python, wheel, tmp_path / "plain.json")
    _run([python, "-m", "pip", "install", "--quiet", wheel], timeout=1200)
    shown = _run([python, "-m", "pip", "show", "pyspark"]).stdout
    assert f"Version: {OTHER_PYSPARK}" in shown
    code = ("import sys, sparktune, sparktune.databricks, sparktune.views, sparktune.cli; "
            "print(sparktune.__file__); print(sorted(m for m in ('pyspark', 'torch', 'mlflow') if m in sys.modules))")
    out = _run([python, "-c", code], cwd=tmp_path, timeout=300).stdout.splitlines()
    assert out[0].startswith(str(tmp_path / "venv")) and out[1] == "[]"
    # The installed console script starts (argument parsing needs no Spark).
    help_text = _run([os.path.join(tmp_path, "venv", "bin", "sparktune"), "--help"], cwd=tmp_path, timeout=300).stdout
    assert "ingest" in help_text
