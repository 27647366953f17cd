"""The SparkSession: the one it is given (Databricks, spark-submit, Spark Connect), else a local one with Delta.

Where the session comes from, first match wins:

1. ``remote`` / ``SPARK_REMOTE`` (``sc://host:port``): a Spark Connect session.
2. An active session (a Databricks notebook or job, or one the caller built).
3. Running under ``spark-submit``: the session spark-submit configured (its ``--master``, its
   ``--conf``); sparktune only fills in Delta settings it did not give, and never overrides them.
4. Otherwise sparktune starts the JVM itself, on ``master`` / ``SPARKTUNE_SPARK_MASTER`` /
   ``local[*]``, with Delta's jars on the driver's and executors' classpath.

Local sessions keep their catalog (a Derby metastore) and warehouse under ``SPARKTUNE_HOME``
(default ``./.sparktune``) so that table names written by one command are found by the next,
as they are in a Databricks workspace.
"""

from __future__ import annotations

import importlib.metadata
import os
import uuid

from sparktune.compat import check_spark_version, delta_artifact
from sparktune.env import env_int, env_value
from sparktune.errors import SparktuneError

__all__ = [
    "check_shared_path",
    "delta_maven_coordinate",
    "delta_submit_args",
    "get_spark",
    "is_connect",
    "is_local_master",
    "spark_master",
    "sparktune_home",
]

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"

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
    home = os.path.abspath(str(env_value("SPARKTUNE_HOME")))
    os.makedirs(home, exist_ok=True)
    return home


def _log4j_file(home: str) -> str:
    path = os.path.join(home, "log4j2.properties")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            if handle.read() == _LOG4J:
                return path
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(_LOG4J)
    return path


def delta_maven_coordinate() -> str:
    """The Maven coordinate of the Delta jar built for the installed pyspark (what ``--packages`` takes)."""
    import pyspark

    return delta_artifact(pyspark.__version__, importlib.metadata.version("delta-spark"))


def _ivy_dir() -> str:
    return env_value("SPARKTUNE_IVY_DIR") or os.path.expanduser("~/.ivy2")


def delta_submit_args() -> list:
    """``spark-submit`` arguments that put Delta on the driver's and executors' classpath.

    The jars an earlier local start resolved (``--jars``: no network, no Ivy) when they are
    cached, else ``--packages`` with the Maven coordinate. ``python -m sparktune.spark`` prints them.
    """
    jars = _resolved_delta_jars(_ivy_dir())
    if jars:
        return ["--jars", ",".join(jars)]
    return ["--packages", delta_maven_coordinate()]


def is_connect(spark) -> bool:
    """True for a Spark Connect session (no JVM here, no ``sparkContext``)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def spark_master(spark) -> str:
    """The session's master URL (``local[2]``, ``spark://...``, ...); '' when the server won't say."""
    from pyspark.errors import PySparkException

    try:
        return str(spark.conf.get("spark.master", "") or "")
    except PySparkException:  # some Connect servers refuse to read static confs
        return ""


def is_local_master(master: str) -> bool:
    return master == "local" or master.startswith(("local[", "local-cluster["))


def _under_spark_submit() -> bool:
    # spark-submit starts the JVM first and hands the Python process its gateway.
    return bool(env_value("PYSPARK_GATEWAY_PORT"))


def get_spark(master: str | None = None, app_name: str = "sparktune", conf: dict | None = None,
              remote: str | None = None):
    """The session to run on: Connect, the active one, spark-submit's, or a new one with Delta.

    ``remote`` (else ``SPARK_REMOTE``) connects to a Spark Connect server. ``master`` falls
    back to ``SPARKTUNE_SPARK_MASTER``, then ``local[*]``; it is ignored when a session or
    spark-submit already chose one. Extra Spark settings come from ``conf``. Delta's jars are
    resolved from Maven (or ``~/.ivy2``) on the first start and cached by Ivy afterwards.
    """
    import pyspark
    from pyspark.sql import SparkSession

    check_spark_version(pyspark.__version__)  # before any session: Spark 3.5 fails later, less clearly
    remote = remote or env_value("SPARK_REMOTE")
    if remote:
        return _connect_session(remote, conf)

    active = SparkSession.getActiveSession()
    if active is not None:
        return active

    home = sparktune_home()
    settings = {
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
        "spark.sql.warehouse.dir": os.path.join(home, "warehouse"),
        "spark.hadoop.javax.jdo.option.ConnectionURL": (
            f"jdbc:derby:;databaseName={os.path.join(home, 'metastore_db')};create=true"
        ),
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": str(env_int("SPARKTUNE_SHUFFLE_PARTITIONS")),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
        # Delta rebuilds table state after each commit with this many tasks (default 50):
        # on a laptop that alone cost ~3.5 s of every small write.
        "spark.databricks.delta.snapshotPartitions": str(max(2, os.cpu_count() or 2)),
    }
    if _under_spark_submit():
        return _submitted_session(app_name, settings, conf or {})

    master = master or str(env_value("SPARKTUNE_SPARK_MASTER"))
    log4j = _log4j_file(home)
    java_opts = f"-Dlog4j.configurationFile=file:{log4j} -Dderby.system.home={home}"
    settings.update({
        "spark.driver.extraJavaOptions": java_opts,
        "spark.ui.enabled": "false",
        "spark.driver.memory": str(env_value("SPARKTUNE_DRIVER_MEMORY")),
        "spark.jars.ivy": _ivy_dir(),
    })
    if is_local_master(master):
        # Executors of a cluster may not see the driver's SPARKTUNE_HOME: they keep their log4j.
        settings["spark.executor.extraJavaOptions"] = java_opts
    settings.update(conf or {})
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    builder = builder.enableHiveSupport()
    jars = _resolved_delta_jars(settings["spark.jars.ivy"])
    if jars:
        # spark.jars set before the JVM starts reaches the driver's classpath and every executor.
        builder = builder.config("spark.jars", ",".join(jars))
    else:
        from delta import configure_spark_with_delta_pip

        ivy_settings = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ivysettings.xml")
        builder = builder.config("spark.jars.ivySettings", env_value("SPARKTUNE_IVY_SETTINGS") or ivy_settings)
        builder = configure_spark_with_delta_pip(builder)
    spark = builder.getOrCreate()
    if not jars:
        _remember_delta_jars(spark, settings["spark.jars.ivy"])
    spark.sparkContext.setLogLevel(env_value("SPARKTUNE_SPARK_LOG_LEVEL") or "ERROR")
    return spark


def _connect_session(remote: str, conf: dict | None):
    from pyspark.sql import SparkSession

    if not remote.startswith("sc://"):
        raise SparktuneError("SPARK_REMOTE / remote: expected a Spark Connect URL like sc://host:15002, found "
                             f"{remote!r}")
    try:
        import grpc  # noqa: F401  (pyspark[connect]'s client needs it; say so before pyspark's ImportError)
    except ImportError:
        raise SparktuneError(
            f"remote {remote}: Spark Connect needs pyspark's connect extras; "
            "pip install 'grpcio>=1.76' 'grpcio-status>=1.76' 'googleapis-common-protos>=1.71' 'zstandard>=0.25'"
        ) from None
    builder = SparkSession.builder.remote(remote)
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    check_spark_version(spark.version)  # the server's Spark runs the UDFs, whatever this client's pyspark is
    return spark


def _submitted_session(app_name: str, settings: dict, conf: dict):
    """The session under spark-submit: its master and settings win; Delta's must already be on its classpath."""
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    SparkContext._ensure_initialized()  # connects to spark-submit's JVM, so SparkConf loads its settings
    submitted = SparkConf()  # what spark-submit passed: --master, --conf, --jars, ...
    builder = SparkSession.builder
    if not submitted.contains("spark.app.name"):
        builder = builder.appName(app_name)
    for key, value in {**settings, **conf}.items():
        if key in conf or not submitted.contains(key):
            builder = builder.config(key, value)
    builder = builder.enableHiveSupport()
    jvm = SparkContext._jvm
    assert jvm is not None  # _ensure_initialized() above connected to the JVM
    loadable = jvm.org.apache.spark.util.Utils.classIsLoadable
    extension = submitted.get("spark.sql.extensions", DELTA_EXTENSION) or ""
    if DELTA_EXTENSION in extension and not loadable(DELTA_EXTENSION):
        raise SparktuneError(
            "spark-submit: Delta Lake's jars are not on the classpath (io.delta.sql.DeltaSparkSessionExtension "
            "cannot be loaded), so no Delta table can be read or written; jars added after the JVM started never "
            f"reach it. Pass them to spark-submit: --packages {delta_maven_coordinate()} "
            "(or the output of `python -m sparktune.spark`, which uses the jars cached in ~/.ivy2)"
        )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(env_value("SPARKTUNE_SPARK_LOG_LEVEL") or "WARN")
    return spark


def check_shared_path(spark, path: str, what: str, *, tasks: int = 8) -> None:
    """Refuse ``path`` up front unless Spark's executors see what the driver writes there.

    Outputs, checkpoints and staged shards are written by executors or training ranks and
    read back by the driver (or the other way round): on a cluster they must live on storage
    every worker mounts. On a non-local master (and always over Spark Connect) this writes a
    marker file from the driver, reads it in ``tasks`` Spark tasks (DataFrame API, so it works
    over Connect too) and raises SparktuneError naming ``what`` (the config key or flag) when
    any task cannot. URIs other than ``file:`` (``s3://``, ``abfss://``, ``dbfs:/``) are
    shared by construction and not checked; nor is any path on a local master.
    """
    if not path:
        raise SparktuneError(f"{what}: is empty; give a folder on storage every Spark worker can read and write")
    if "://" in path or (":" in path.split("/", 1)[0] and not path.startswith("file:")):
        return
    local = os.path.abspath(os.path.expanduser(path.removeprefix("file:")))
    if not is_connect(spark) and is_local_master(spark_master(spark)):
        return
    try:
        os.makedirs(local, exist_ok=True)
        token = uuid.uuid4().hex
        marker = os.path.join(local, f".sparktune-shared-check-{token}")
        with open(marker, "w", encoding="utf-8") as handle:
            handle.write(token)
    except OSError as exc:
        raise SparktuneError(f"{what}: cannot write to {local} from the driver ({exc}); choose a writable shared "
                             "folder") from None
    try:
        seen = (
            spark.range(0, tasks, 1, tasks)
            .mapInPandas(_marker_probe(marker, token), "seen boolean, executor string")
            .collect()
        )
    finally:
        os.remove(marker)
    blind = sorted({row["executor"] for row in seen if not row["seen"]})
    if blind:
        raise SparktuneError(
            f"{what}: {local} is not shared storage: the driver wrote a file there that Spark tasks on "
            f"{', '.join(blind)} cannot read, so what ranks or executors write there would be lost (or read "
            f"from the wrong disk). Set {what} to a folder every worker mounts at the same path (NFS, /dbfs/..., "
            "a cloud URI such as s3://...), not the driver's local or temporary disk"
        )


def _marker_probe(marker: str, token: str):
    def probe(batches):
        import socket

        import pandas as pd

        try:
            with open(marker, encoding="utf-8") as handle:
                ok = handle.read() == token
        except OSError:
            ok = False
        where = f"{socket.gethostname()} (pid {os.getpid()})"
        for batch in batches:
            yield pd.DataFrame({"seen": [ok] * len(batch), "executor": [where] * len(batch)})

    return probe


def _jar_list_file(ivy_dir: str) -> str:
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
    listed = spark.conf.get("spark.jars", "") or ""
    jars = [j[len("file:"):].lstrip("/") for j in listed.split(",") if j.endswith(".jar")]
    jars = ["/" + j for j in jars]
    if jars and all(os.path.exists(j) for j in jars) and any("delta-spark" in j for j in jars):
        tmp = _jar_list_file(ivy_dir) + f".{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write("\n".join(jars) + "\n")
        os.replace(tmp, _jar_list_file(ivy_dir))


if __name__ == "__main__":
    # `spark-submit $(python -m sparktune.spark) --master spark://... jobs/pipeline.py ...`
    print(" ".join(delta_submit_args()))
