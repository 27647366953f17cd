# Databricks notebook source
# MAGIC %md
# MAGIC # Run one sparktune stage
# MAGIC
# MAGIC A job task that runs `sparktune <stage> <args>` in a notebook. The Asset Bundle's `train` task uses it:
# MAGIC Databricks lets only notebook tasks publish task values (`dbutils.jobs.taskValues`), and the later
# MAGIC tasks read the training run's id and model URI from them (`{{tasks.train.values.run_id}}`).
# MAGIC
# MAGIC Widgets: `stage` (e.g. `train`) and `args`, a JSON list of the stage's flags exactly as on the
# MAGIC command line. Locally: `SPARKTUNE_NB_STAGE=stats SPARKTUNE_NB_ARGS='["--table", "./data/t"]'
# MAGIC python notebooks/run_stage.py`.

# COMMAND ----------

import json

from sparktune.cli import main
from sparktune.databricks import notebook_param
from sparktune.errors import SparktuneError

STAGE = notebook_param("stage", "")
ARGS = notebook_param("args", "[]")
try:
    argv = [STAGE, *json.loads(ARGS)]
except json.JSONDecodeError as exc:
    raise SparktuneError(f"args: expected a JSON list of strings, found {ARGS!r} ({exc.msg})") from None
if not STAGE or not all(isinstance(a, str) for a in argv):
    raise SparktuneError(f"stage/args: expected a stage name and a JSON list of strings, found {STAGE!r} {ARGS!r}")

# COMMAND ----------

status = main(argv)
if status != 0:
    # Fail the task (a notebook that returns normally counts as succeeded).
    raise SparktuneError(f"sparktune {STAGE} exited with status {status}; see the output above")
