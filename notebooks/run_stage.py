# Databricks notebook source
# MAGIC %md
# MAGIC # Run one sparktune stage
# MAGIC
# MAGIC A job task that runs `sparktune <stage> <args>` in a notebook. The Asset Bundle's `train` task uses it:
# MAGIC Databricks lets only notebook tasks publish task values (`dbutils.jobs.taskValues`), and the later
# MAGIC tasks read the training run's id and model URI from them (`{{tasks.train.values.run_id}}`).
# MAGIC
# MAGIC Widgets: `stage` (e.g. `train`) and `args`, a JSON list of the stage's flags exactly as on the
# MAGIC command line; optionally `config_section`: the `--config` file is a pipeline config (one section
# MAGIC per stage, as `sparktune pipeline` reads) and the stage takes this section of it (e.g. `train`).
# MAGIC Locally: `SPARKTUNE_NB_STAGE=stats SPARKTUNE_NB_ARGS='["--table", "./data/t"]'
# MAGIC python notebooks/run_stage.py`.

# COMMAND ----------

import json
import os
import tempfile

import yaml

from sparktune.cli import main
from sparktune.databricks import notebook_param
from sparktune.errors import SparktuneError

STAGE = notebook_param("stage", "")
ARGS = notebook_param("args", "[]")
SECTION = notebook_param("config_section", "")
try:
    argv = [STAGE, *json.loads(ARGS)]
except json.JSONDecodeError as exc:
    raise SparktuneError(f"args: expected a JSON list of strings, found {ARGS!r} ({exc.msg})") from None
if not STAGE or not all(isinstance(a, str) for a in argv):
    raise SparktuneError(f"stage/args: expected a stage name and a JSON list of strings, found {STAGE!r} {ARGS!r}")

if SECTION:
    # The stage reads one section of a pipeline config: write that section to a file of its own
    # (on the driver, which is the only process that reads --config) and pass that instead.
    if "--config" not in argv[:-1]:
        raise SparktuneError(f"config_section: {SECTION!r} given, but args have no --config FILE: {ARGS!r}")
    where = argv.index("--config") + 1
    with open(argv[where], encoding="utf-8") as handle:
        pipeline_config = yaml.safe_load(handle)
    if not isinstance(pipeline_config, dict) or not isinstance(pipeline_config.get(SECTION), dict):
        raise SparktuneError(f"config_section: {argv[where]} has no {SECTION!r} section; expected a pipeline "
                             "config with one section per stage, or leave config_section empty")
    fd, section_file = tempfile.mkstemp(prefix=f"sparktune-{SECTION}-", suffix=".yaml")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        yaml.safe_dump(pipeline_config[SECTION], handle)
    argv[where] = section_file

# COMMAND ----------

status = main(argv)
if status != 0:
    # Fail the task (a notebook that returns normally counts as succeeded).
    raise SparktuneError(f"sparktune {STAGE} exited with status {status}; see the output above")
