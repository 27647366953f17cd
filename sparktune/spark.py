"""The SparkSession: the one it is given (Databricks, spark-submit, Spark Connect), else a local one with Delta.

Where the session comes from, first match wins:

1. ``remote`` / ``SPARK_REMOTE`` (``sc://host:port``): a Spark Connect session.
2. An active session (a Databricks notebook or job, or one the caller built).
3. Running under ``spark-submit``: the session spark-submit configured (its ``--master``, its
   ``--conf``); sparktune only fills in Delta settings it did not give, and never overrides them.
4. Otherwise sparktune starts the JVM itself, on ``master`` / ``SPARKTUNE_SPARK_MASTER`` /
   ``local[*]``, with Delta's jars on the driver's and executors' classpath, and the JVM's
   garbage collector of ``SPARKTUNE_SPARK_GC`` (``parallel``) unless the user chose JVM options.

Local sessions keep their catalog (a Derby metastore) and warehouse under ``SPARKTUNE_HOME``
(default ``./.sparktune``) so that table names written by one command are found by the next,
as they are in a Databricks workspace.
"""

from __future__ import annotations

import enum
import importlib.metadata
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from sparktune.compat import check_spark_version, delta_artifact
from sparktune.env import env_int, env_value, sparktune_home
from sparktune.errors import SparktuneError

__all__ = [
    "SessionFacts",
    "SessionKind",
    "check_shared_path",
    "delta_maven_coordinate",
    "delta_submit_args",
    "gc_java_options",
    "get_spark",
    "is_connect",
    "is_local_master",
    "local_cores",
    "session_facts",
    "spark_master",
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


# ---------------------------------------------------------------------------------------------
# Session facts: what kind of session this is and how much it can run at once, worked out once.


class SessionKind(str, enum.Enum):
    LOCAL = "local"
    """A local master (``local``, ``local[N]``, ``local[*]``, ``local-cluster[...]``)."""
    CLUSTER = "cluster"
    """A cluster master (``spark://``, ``yarn``, ``k8s://``...)."""
    CONNECT = "connect"
    """A Spark Connect client (``sc://``): no JVM here, the server's settings may be hidden."""
    DATABRICKS = "databricks"
    """A Databricks cluster or serverless compute (classic or Connect)."""


_LOCAL = re.compile(r"^local(?:\[(\*|\d+)(?:,\s*\d+)?\])?$")
_LOCAL_CLUSTER = re.compile(r"^local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,")


def local_cores(master: str, cpu_count: int | None = None) -> int | None:
    """Cores a local master runs tasks on: ``local`` 1, ``local[N]`` (and ``local[N,retries]``) N,
    ``local[*]`` this machine's, ``local-cluster[workers,cores,mb]`` workers x cores; None for
    any other master (a cluster: its scheduler knows)."""
    master = (master or "").strip()
    match = _LOCAL.match(master)
    if match:
        inner = match.group(1)
        if inner is None:
            return 1
        return max(1, cpu_count or os.cpu_count() or 1) if inner == "*" else max(1, int(inner))
    match = _LOCAL_CLUSTER.match(master)
    if match:
        return int(match.group(1)) * int(match.group(2))
    return None


# The settings session_facts reads (the launch plan's GPU settings among them).
FACT_KEYS = (
    "spark.master", "spark.default.parallelism", "spark.sql.shuffle.partitions", "spark.task.cpus",
    "spark.executor.instances", "spark.executor.cores", "spark.driver.resource.gpu.amount",
    "spark.driver.resource.gpu.discoveryScript", "spark.executor.resource.gpu.amount",
    "spark.executor.resource.gpu.discoveryScript", "spark.task.resource.gpu.amount",
    "spark.databricks.clusterUsageTags.clusterId",
)


def _int(value) -> int | None:
    try:
        return int(str(value).strip()) if value not in (None, "") else None
    except ValueError:
        return None


def _float(value) -> float:
    try:
        return float(value) if value not in (None, "") else 0.0
    except ValueError:
        return 0.0


@dataclass(frozen=True)
class SessionFacts:
    """What a session is and what it can run at once, from its settings alone (no Spark job).

    Build it with ``session_facts(spark)``, or ``SessionFacts.from_conf`` from settings already
    read. ``conf`` holds the ``FACT_KEYS`` the session would show (unset ones are absent).
    """

    master: str
    """The master URL; '' when the server will not say (some Connect servers)."""
    kind: SessionKind
    connect: bool
    local_cores: int | None
    """Cores of a local master (``local_cores``), None on a cluster or an unknown master."""
    default_parallelism: int | None
    """``spark.default.parallelism`` when set."""
    shuffle_partitions: int | None
    task_cpus: int
    executor_instances: int | None
    executor_cores: int | None
    executor_gpus: float
    task_gpus: float
    driver_gpus: float
    conf: Mapping[str, str] = field(default_factory=dict, hash=False)

    @classmethod
    def from_conf(cls, conf: Mapping[str, str], *, connect: bool = False, cpu_count: int | None = None,
                  environ: Mapping[str, str] | None = None) -> SessionFacts:
        """The facts of a session with these settings (pure: for tests and for the launch plan)."""
        env = os.environ if environ is None else environ
        master = str(conf.get("spark.master") or "")
        databricks = bool(conf.get("spark.databricks.clusterUsageTags.clusterId")
                          or env.get("DATABRICKS_RUNTIME_VERSION"))
        if databricks:
            kind = SessionKind.DATABRICKS
        elif connect or master.startswith("sc://"):
            kind = SessionKind.CONNECT
        elif is_local_master(master):
            kind = SessionKind.LOCAL
        else:
            kind = SessionKind.CLUSTER
        return cls(master=master, kind=kind, connect=connect or master.startswith("sc://"),
                   local_cores=local_cores(master, cpu_count), default_parallelism=_int(conf.get(
                       "spark.default.parallelism")), shuffle_partitions=_int(conf.get("spark.sql.shuffle.partitions")),
                   task_cpus=max(1, _int(conf.get("spark.task.cpus")) or 1),
                   executor_instances=_int(conf.get("spark.executor.instances")),
                   executor_cores=_int(conf.get("spark.executor.cores")),
                   executor_gpus=_float(conf.get("spark.executor.resource.gpu.amount")),
                   task_gpus=_float(conf.get("spark.task.resource.gpu.amount")),
                   driver_gpus=_float(conf.get("spark.driver.resource.gpu.amount")), conf=dict(conf))

    @property
    def is_local(self) -> bool:
        return self.local_cores is not None

    @property
    def local_task_slots(self) -> int | None:
        """Concurrent tasks a local master runs (cores / ``spark.task.cpus``); None on a cluster."""
        return None if self.local_cores is None else self.local_cores // self.task_cpus

    @property
    def task_slots(self) -> int | None:
        """Concurrent tasks, as far as the settings say: the default parallelism, a local master's
        slots, or executors x cores / task cpus; None when they do not say."""
        if self.default_parallelism:
            return self.default_parallelism
        if self.local_cores is not None:
            return max(1, self.local_cores // self.task_cpus)
        if self.executor_instances and self.executor_cores:
            return max(1, self.executor_instances * self.executor_cores // self.task_cpus)
        return None


def session_facts(spark, cpu_count: int | None = None) -> SessionFacts:
    """The ``SessionFacts`` of a live session (classic or Connect), read through ``spark.conf`` only."""
    conf = {}
    for key in FACT_KEYS:
        try:
            value = spark.conf.get(key, None)
        except Exception:  # noqa: BLE001  (a Connect server may refuse to show a static setting: unknown)
            value = None
        if value is not None:
            conf[key] = str(value)
    return SessionFacts.from_conf(conf, connect=is_connect(spark), cpu_count=cpu_count)


# SPARKTUNE_SPARK_GC -> the JVM flag. The stages are throughput batch work (read, convert, write
# Parquet): the parallel collector spent less JVM CPU than G1's concurrent cycles, and G1 with larger
# regions did not do better (BENCHMARKS.md, "Driver JVM garbage collector: ParallelGC by default").
# "none" leaves the JVM's own choice (G1 on 2+ cores and 2+ GB).
GC_FLAGS = {"parallel": "-XX:+UseParallelGC", "g1": "-XX:+UseG1GC", "none": ""}
# Where else a collector can be chosen for the driver JVM a local start launches.
_JAVA_OPTION_VARIABLES = ("JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "SPARK_SUBMIT_OPTS")
_GC_FLAG = re.compile(r"-XX:\+Use\w*GC\b")


def gc_java_options(conf: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The collector flag for the JVM of a session sparktune starts ('' for none).

    ``SPARKTUNE_SPARK_GC`` picks it (``parallel`` by default, ``g1``, ``none``). Nothing is added
    when the user already chose JVM options or a collector: ``conf`` gives the driver's
    ``extraJavaOptions`` (they replace sparktune's) or a ``defaultJavaOptions`` naming a
    collector, or a Java options variable names one; two collector flags stop the JVM from starting.
    """
    env = os.environ if environ is None else environ
    given = env_value("SPARKTUNE_SPARK_GC", env) or ""
    choice = given.strip().lower()
    if choice not in GC_FLAGS:
        raise SparktuneError(f"$SPARKTUNE_SPARK_GC: expected one of {', '.join(GC_FLAGS)}, found {given!r}")
    conf = conf or {}
    if conf.get("spark.driver.extraJavaOptions") or _GC_FLAG.search(str(conf.get("spark.driver.defaultJavaOptions")
                                                                             or "")):
        return ""
    if any(_GC_FLAG.search(env.get(name) or "") for name in _JAVA_OPTION_VARIABLES):
        return ""
    return GC_FLAGS[choice]


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
    gc = gc_java_options(conf)
    if gc:
        java_opts += f" {gc}"
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
