"""The SparkSession: Databricks' when there is one, else a local one with Delta Lake.

Local sessions keep their catalog (a Derby metastore) and warehouse under ``SPARKTUNE_HOME``
(default ``./.sparktune``) so that table names written by one command are found by the next,
as they are in a Databricks workspace.
"""

from __future__ import annotations

import os

__all__ = ["get_spark", "sparktune_home", "stop_local_spark"]

_LOG4J = """\
rootLogger.level = error
rootLogger.appenderRef.stdout.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n
"""


def sparktune_home() -> str:
    home = os.path.abspath(os.environ.get("SPARKTUNE_HOME", ".sparktune"))
    os.makedirs(home, exist_ok=True)
    return home


def _log4j_file(home: str) -> str:
    path = os.path.join(home, "log4j2.properties")
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(_LOG4J)
    return path


def get_spark(master: str | None = None, app_name: str = "sparktune", conf: dict | None = None):
    """Return the active SparkSession, or build a local one with Delta Lake enabled.

    ``master`` falls back to ``SPARKTUNE_SPARK_MASTER``, then ``local[*]``. Extra Spark
    settings come from ``conf``. Delta's jars are resolved from Maven (or ``~/.m2``) on the
    first start and cached by Ivy afterwards.
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active

    from delta import configure_spark_with_delta_pip

    home = sparktune_home()
    log4j = _log4j_file(home)
    master = master or os.environ.get("SPARKTUNE_SPARK_MASTER") or "local[*]"
    java_opts = f"-Dlog4j.configurationFile=file:{log4j} -Dderby.system.home={home}"
    settings = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.warehouse.dir": os.path.join(home, "warehouse"),
        "spark.hadoop.javax.jdo.option.ConnectionURL": (
            f"jdbc:derby:;databaseName={os.path.join(home, 'metastore_db')};create=true"
        ),
        "spark.driver.extraJavaOptions": java_opts,
        "spark.executor.extraJavaOptions": java_opts,
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": os.environ.get("SPARKTUNE_SHUFFLE_PARTITIONS", "8"),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.driver.memory": os.environ.get("SPARKTUNE_DRIVER_MEMORY", "4g"),
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
        "spark.jars.ivy": os.environ.get("SPARKTUNE_IVY_DIR", os.path.expanduser("~/.ivy2")),
    }
    settings.update(conf or {})
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    builder = builder.enableHiveSupport()
    spark = configure_spark_with_delta_pip(builder).getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("SPARKTUNE_SPARK_LOG_LEVEL", "ERROR"))
    return spark


def stop_local_spark() -> None:
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
