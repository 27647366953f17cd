"""A real Spark standalone cluster on this machine: one master and N workers from the installed pyspark.

    python jobs/local_cluster.py start [--workers 2] [--cores 1] [--memory 2g] [--dir ./.cluster]
    python jobs/local_cluster.py status [--dir ./.cluster]
    python jobs/local_cluster.py stop   [--dir ./.cluster]

``start`` prints the master URL and the shared storage folder, and leaves the processes
running (their pids and logs in ``--dir``); ``stop`` ends every process it started. The test
suite starts the same cluster through ``start_cluster`` (the ``spark_cluster`` fixture).

Every process listens on loopback only, on free ports: the master on 127.0.0.1, worker i on
127.0.0.(2+i), so that each worker is a host of its own to Spark. Each worker gets one work dir of its
own and, unless ``--no-hide`` is given, runs in a private mount namespace (``unshare -m``)
with an empty tmpfs over ``/tmp`` (and over any other folder passed with ``--hide``): the
driver's temporary files are invisible to its executors, as they would be on another
machine, so a job that depends on the driver's disk fails here instead of passing by luck.
What driver and executors must both see goes to the *shared storage*: a folder outside
``/tmp`` (``--shared``, default ``<dir>/shared``), like an NFS mount on a real cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field

__all__ = ["ConnectServer", "LocalCluster", "spark_home", "start_cluster", "start_connect_server"]

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE_FILE = "cluster.json"


def spark_home() -> str:
    """The Spark distribution pyspark ships (bin/spark-class, jars/); ``SPARK_HOME`` wins when set."""
    import pyspark

    return os.environ.get("SPARK_HOME") or os.path.dirname(os.path.abspath(pyspark.__file__))


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class LocalCluster:
    """A running standalone cluster; ``stop()`` ends all of it."""

    master_url: str
    """``spark://127.0.0.1:PORT``: what ``--master`` / ``SPARKTUNE_SPARK_MASTER`` take."""
    ui_url: str
    shared_dir: str
    """The shared storage: a folder driver and every worker see at the same path."""
    work_dir: str
    """Logs, worker work dirs (executor stdout/stderr) and the state file."""
    workers: int
    hidden: list = field(default_factory=list)
    """Folders each worker sees as an empty tmpfs (the driver's temp folders)."""
    pids: list = field(default_factory=list)
    """Process-group leaders: the master, then each worker (executors run in their worker's group)."""

    def alive_workers(self) -> int:
        with urllib.request.urlopen(self.ui_url + "/json/", timeout=5) as response:
            state = json.load(response)
        return sum(1 for w in state.get("workers", []) if w.get("state") == "ALIVE")

    def remaining(self) -> list:
        """Pids still running in the cluster's process groups (empty once stopped)."""
        left = []
        for pgid in self.pids:
            out = subprocess.run(["pgrep", "-g", str(pgid)], check=False, capture_output=True, text=True).stdout
            left += [int(p) for p in out.split()]
        return left

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every process group (workers first, so they end their executors), then SIGKILL."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pgid in reversed(self.pids):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5)
            while self.remaining() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.remaining():
                break
        state = os.path.join(self.work_dir, STATE_FILE)
        if os.path.exists(state):
            os.remove(state)

    def save(self) -> None:
        with open(os.path.join(self.work_dir, STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump(asdict(self), handle, indent=2)

    @classmethod
    def load(cls, work_dir: str) -> LocalCluster:
        with open(os.path.join(work_dir, STATE_FILE), encoding="utf-8") as handle:
            return cls(**json.load(handle))


def _hiding_prefix(hidden: list, keep: list, stash: str) -> list:
    """argv prefix that runs a command in a private mount namespace with tmpfs over ``hidden``.

    ``keep``: folders inside a hidden one that the worker must still see at the same path (the
    project's checkout, as a real cluster has the code deployed on every node); they are
    bind-mounted aside under ``stash`` first, then back on top of the tmpfs.
    """
    steps = []
    for i, path in enumerate(keep):
        aside = os.path.join(stash, str(i))
        steps.append(f"mkdir -p {shlex.quote(aside)} && mount --bind {shlex.quote(path)} {shlex.quote(aside)}")
    steps += [f"mount -t tmpfs -o size=4g tmpfs {shlex.quote(p)}" for p in hidden]
    for i, path in enumerate(keep):
        aside = os.path.join(stash, str(i))
        steps.append(f"mkdir -p {shlex.quote(path)} && mount --bind {shlex.quote(aside)} {shlex.quote(path)}")
    # Root has CAP_SYS_ADMIN; anyone else needs a user namespace mapped to root (-r).
    flags = ["-m", "--propagation", "private"] if os.geteuid() == 0 else ["-r", "-m", "--propagation", "private"]
    return ["unshare", *flags, "sh", "-c", " && ".join(steps) + ' && exec "$0" "$@"']


def _inside(path: str, folders: list) -> bool:
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


def _wait(predicate, what: str, log: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.3)
    tail = ""
    if os.path.exists(log):
        with open(log, encoding="utf-8", errors="replace") as handle:
            tail = "".join(handle.readlines()[-30:])
    raise RuntimeError(f"local cluster: {what} not up after {timeout:.0f}s; last lines of {log}:\n{tail}")


def start_cluster(work_dir: str, *, workers: int = 2, cores: int = 1, memory: str = "2g",
                  shared_dir: str | None = None, hide: list | None = None, hide_tmp: bool = True,
                  env: dict | None = None, timeout: float = 90.0) -> LocalCluster:
    """Start a master and ``workers`` workers; returns once every worker has registered.

    ``hide``: extra folders (besides ``/tmp`` when ``hide_tmp``) the workers must not see,
    e.g. a pytest basetemp outside /tmp. ``env``: extra environment for the master and
    workers (executors inherit it: ``PYTHONPATH``, ``PYSPARK_PYTHON``).
    """
    work_dir = os.path.abspath(work_dir)
    shared_dir = os.path.abspath(shared_dir or os.path.join(work_dir, "shared"))
    hidden = (["/tmp"] if hide_tmp else []) + [os.path.abspath(p) for p in hide or []]
    for path in hidden:
        if shared_dir == path or shared_dir.startswith(path.rstrip("/") + "/"):
            raise ValueError(f"shared_dir {shared_dir} is inside {path}, which the workers cannot see")
    os.makedirs(shared_dir, exist_ok=True)
    os.makedirs(work_dir, exist_ok=True)
    home = spark_home()
    spark_class = os.path.join(home, "bin", "spark-class")
    base_env = {**os.environ, "SPARK_HOME": home, "SPARK_LOCAL_IP": "127.0.0.1",
                "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable),
                "SPARK_NO_DAEMONIZE": "1", **(env or {})}
    master_port, master_ui = _free_port(), _free_port()
    cluster = LocalCluster(master_url=f"spark://127.0.0.1:{master_port}", ui_url=f"http://127.0.0.1:{master_ui}",
                           shared_dir=shared_dir, work_dir=work_dir, workers=workers, hidden=hidden)

    def launch(argv: list, log: str, extra_env: dict) -> None:
        with open(log, "w", encoding="utf-8") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**base_env, **extra_env}, start_new_session=True)
        cluster.pids.append(proc.pid)

    try:
        master_log = os.path.join(work_dir, "master.log")
        launch([spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                "--port", str(master_port), "--webui-port", str(master_ui)], master_log, {})
        _wait(lambda: cluster.alive_workers() >= 0, "the master", master_log, timeout)
        for i in range(workers):
            worker_dir = os.path.join(work_dir, f"worker-{i}")
            os.makedirs(worker_dir, exist_ok=True)
            # Each worker is its own host (127.0.0.2, 127.0.0.3, ...: all loopback), so executors fetch
            # shuffle blocks over the network as on separate machines, not from each other's disk.
            host = f"127.0.0.{2 + i}"
            argv = [spark_class, "org.apache.spark.deploy.worker.Worker", "--host", host,
                    "--port", str(_free_port(host)), "--webui-port", str(_free_port(host)), "--cores", str(cores),
                    "--memory", memory, "--work-dir", worker_dir, cluster.master_url]
            if hidden:
                # The checkout stays visible when it lies in a hidden folder (a clone under /tmp).
                keep = [p for p in (PROJECT_ROOT,) if _inside(p, hidden)]
                argv = _hiding_prefix(hidden, keep, os.path.join(worker_dir, "keep")) + argv
            launch(argv, os.path.join(work_dir, f"worker-{i}.log"),
                   {"SPARK_WORKER_DIR": worker_dir, "SPARK_LOCAL_IP": host, "SPARK_LOCAL_HOSTNAME": host})
        _wait(lambda: cluster.alive_workers() >= workers, f"{workers} workers", os.path.join(work_dir, "worker-0.log"),
              timeout)
    except BaseException:
        cluster.stop()
        raise
    cluster.save()
    return cluster


@dataclass
class ConnectServer:
    """A Spark Connect server (``SparkConnectServer`` under spark-submit) with Delta; ``stop()`` ends it."""

    url: str
    """``sc://127.0.0.1:PORT``: what ``SparkSession.builder.remote`` / ``SPARK_REMOTE`` take."""
    log: str
    pid: int

    def remaining(self) -> list:
        out = subprocess.run(["pgrep", "-g", str(self.pid)], check=False, capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self, timeout: float = 20.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + timeout
            while self.remaining() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.remaining():
                return


def start_connect_server(work_dir: str, *, master: str = "local[2]", env: dict | None = None,
                         conf: dict | None = None, timeout: float = 180.0) -> ConnectServer:
    """Start a Spark Connect server on a free loopback port, with Delta's jars, extension and catalog.

    The server is the driver: its ``master`` may be ``local[N]`` or a cluster's ``spark://`` URL.
    """
    from sparktune.spark import DELTA_CATALOG, DELTA_EXTENSION, delta_submit_args

    work_dir = os.path.abspath(work_dir)
    os.makedirs(work_dir, exist_ok=True)
    port = _free_port()
    settings = {
        "spark.connect.grpc.binding.address": "127.0.0.1",
        "spark.connect.grpc.binding.port": str(port),
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
        "spark.sql.warehouse.dir": os.path.join(work_dir, "warehouse"),
        "spark.ui.enabled": "false",
        "spark.sql.shuffle.partitions": "4",
        "spark.databricks.delta.snapshotPartitions": "2",
        **(conf or {}),
    }
    argv = [os.path.join(spark_home(), "bin", "spark-submit"), "--master", master,
            "--class", "org.apache.spark.sql.connect.service.SparkConnectServer", *delta_submit_args()]
    for key, value in settings.items():
        argv += ["--conf", f"{key}={value}"]
    argv.append("spark-internal")
    log = os.path.join(work_dir, "connect-server.log")
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=work_dir,
                                env={**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", **(env or {})},
                                start_new_session=True)
    server = ConnectServer(url=f"sc://127.0.0.1:{port}", log=log, pid=proc.pid)

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"Spark Connect server exited with {proc.returncode}; see {log}")
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    try:
        _wait(listening, "the Spark Connect server", log, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", default=".cluster", help="state, logs and worker dirs (default ./.cluster)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cores", type=int, default=1, help="cores per worker")
    parser.add_argument("--memory", default="2g", help="memory per worker, e.g. 2g")
    parser.add_argument("--shared", help="the shared storage folder (default DIR/shared; must be outside /tmp)")
    parser.add_argument("--hide", action="append", default=[], help="another folder the workers must not see")
    parser.add_argument("--no-hide", action="store_true", help="let workers see /tmp (no mount namespace)")
    args = parser.parse_args(argv)
    work_dir = os.path.abspath(args.dir)
    if args.action == "start":
        if os.path.exists(os.path.join(work_dir, STATE_FILE)):
            print(f"a cluster is already recorded in {work_dir}; stop it first", file=sys.stderr)
            return 1
        env = {"PYTHONPATH": os.environ.get("PYTHONPATH", "")} if os.environ.get("PYTHONPATH") else {}
        cluster = start_cluster(work_dir, workers=args.workers, cores=args.cores, memory=args.memory,
                                shared_dir=args.shared, hide=args.hide, hide_tmp=not args.no_hide, env=env)
        print(f"master:  {cluster.master_url}\nweb UI:  {cluster.ui_url}\nshared:  {cluster.shared_dir}\n"
              f"logs:    {cluster.work_dir}\nstop:    python jobs/local_cluster.py stop --dir {args.dir}")
        return 0
    try:
        cluster = LocalCluster.load(work_dir)
    except FileNotFoundError:
        print(f"no cluster recorded in {work_dir}", file=sys.stderr)
        return 1
    if args.action == "status":
        print(f"master: {cluster.master_url}  alive workers: {cluster.alive_workers()}  shared: {cluster.shared_dir}")
        return 0
    cluster.stop()
    left = cluster.remaining()
    print("stopped" if not left else f"still running: {left}")
    return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(main())
