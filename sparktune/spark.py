"""The SparkSession: Databricks' when there is one, else a local one with Delta Lake.

Local sessions keep their catalog (a Derby metastore) and warehouse under ``SPARKTUNE_HOME``
(default ``./.sparktune``) so that table names written by one command are found by the next,
as they are in a Databricks workspace.
"""

from __future__ import annotations

import os

__all__ = ["get_spark", "sparktune_home"]

# Spark prints "Setting default log level" at every PySpark start unless the level configured
# for org.apache.spark equals the root level: both are ERROR.
_LOG4J = """\
rootLogger.level = error
logger.hadoop.name = org.apache.hadoop
logger.hadoop.level = error
logger.spark.name = org.apache.spark
logger.spark.level = error
logger.delta.name = org.apache.spark.sql.delta
logger.delta.level = error
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
    if not os.path.exists(path) or open(path, encoding="utf-8").read() != _LOG4J:
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
        # Delta rebuilds table state after each commit with this many tasks (default 50):
        # on a laptop that alone cost ~3.5 s of every small write.
        "spark.databricks.delta.snapshotPartitions": str(max(2, os.cpu_count() or 2)),
        "spark.jars.ivy": os.environ.get("SPARKTUNE_IVY_DIR", os.path.expanduser("~/.ivy2")),
    }
    settings.update(conf or {})
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    builder = builder.enableHiveSupport()
    jars = _resolved_delta_jars(settings["spark.jars.ivy"])
    if jars:
        builder = builder.config("spark.jars", ",".join(jars))
    else:
        ivy_settings = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ivysettings.xml")
        builder = builder.config("spark.jars.ivySettings", os.environ.get("SPARKTUNE_IVY_SETTINGS", ivy_settings))
        builder = configure_spark_with_delta_pip(builder)
    spark = builder.getOrCreate()
    if not jars:
        _remember_delta_jars(spark, settings["spark.jars.ivy"])
    spark.sparkContext.setLogLevel(os.environ.get("SPARKTUNE_SPARK_LOG_LEVEL", "ERROR"))
    return spark


def _jar_list_file(ivy_dir: str) -> str:
    import importlib.metadata

    import pyspark

    delta = importlib.metadata.version("delta-spark")
    return os.path.join(ivy_dir, f"sparktune-delta-{delta}-spark-{pyspark.__version__}.jars")


def _resolved_delta_jars(ivy_dir: str) -> list:
    """The jars Ivy resolved for Delta on an earlier start, if all are still on disk.

    Handing Spark the jar files skips Ivy's resolution: a quieter and faster start.
    """
    path = _jar_list_file(ivy_dir)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        jars = [line.strip() for line in handle if line.strip()]
    return jars if jars and all(os.path.exists(j) for j in jars) else []


def _remember_delta_jars(spark, ivy_dir: str) -> None:
    listed = spark.sparkContext.getConf().get("spark.jars", "")
    jars = [j[len("file:"):].lstrip("/") for j in listed.split(",") if j.endswith(".jar")]
    jars = ["/" + j for j in jars]
    if jars and all(os.path.exists(j) for j in jars) and any("delta-spark" in j for j in jars):
        tmp = _jar_list_file(ivy_dir) + f".{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write("\n".join(jars) + "\n")
        os.replace(tmp, _jar_list_file(ivy_dir))
