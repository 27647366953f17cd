"""Model worker processes for ``sparktune serve``'s micro-batcher.

On a CPU, two batches computed at once on two threads of one process share one interpreter lock:
an eager forward pass of a small transformer spends milliseconds per pass in Python (module calls,
hooks), and that part runs one thread at a time. Measured on this 2-core CPU (MiniLM, bf16, one
torch thread per worker, the sparktune pyfunc; ``bench/bench_serve_workers.py``, BENCHMARKS.md):
two processes scored 1.25-1.30x two threads' rows/s at one row per batch and 1.05-1.09x at four,
and behind the HTTP server 1.12-1.14x at 8 clients and 1.10-1.17x at 32. So where the model is small
beside the machine's memory, each batch worker is a process holding its own copy of the model,
and the server's event loop hands it batches over a pipe.

A worker loads the model the way the server does (``mlflow.pyfunc.load_model`` with the same
load-time options), so both answer alike; it sends back the records of the model's answer, or
``timeout`` / ``error`` with a message (never the exception object: its class lives in the
model's own code copy, which the server may not import under the same name).
"""

from __future__ import annotations

import os
import queue
import signal
from dataclasses import dataclass
from enum import Enum
from typing import Any

from sparktune.errors import SparktuneError

__all__ = ["ModelProcesses", "WorkerKind", "choose_worker_kind", "score_records"]

# How long a worker may take to import torch and load the model before the server gives up.
_LOAD_TIMEOUT_S = 600.0
# A worker's model copy may use at most this share of the memory available when the server starts.
_MEMORY_SHARE = 0.5


class WorkerKind(str, Enum):
    """Where a batch worker runs: a thread of the server's process, or a process of its own."""

    AUTO = "auto"
    PROCESS = "process"
    THREAD = "thread"


def model_bytes(model_dir: str) -> int:
    """Bytes of the model folder's files: an upper bound of one loaded copy's weights (bf16 halves them)."""
    total = 0
    for root, _dirs, files in os.walk(model_dir):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                continue
    return total


def choose_worker_kind(setting: WorkerKind, workers: int, device: str, copy_bytes: int,
                       available_bytes: int) -> WorkerKind:
    """Processes where they pay and fit: more than one worker, on a CPU (a GPU holds one model per
    process, and its passes do not wait on Python), and every copy (the server's own included)
    within half the available memory. ``auto`` decides; ``process`` / ``thread`` are kept as asked."""
    if setting != WorkerKind.AUTO:
        return setting
    if workers > 1 and device == "cpu" and copy_bytes * (workers + 1) <= _MEMORY_SHARE * available_bytes:
        return WorkerKind.PROCESS
    return WorkerKind.THREAD


def score_records(model, deadline_var, texts: list[str], deadline: float) -> list[dict]:
    """The model's answer for ``texts`` as one record (a dict of columns) per row, with the request's
    deadline set for the model's batch loop. What MLflow's ``predictions_to_json`` writes for a
    DataFrame is its records, so the server slices this list per request."""
    import pandas as pd

    from sparktune.model.pyfunc import TEXT_COLUMN

    token = deadline_var.set(deadline) if deadline_var is not None else None
    try:
        frame = model.predict(pd.DataFrame({TEXT_COLUMN: texts}))
    finally:
        if token is not None:
            deadline_var.reset(token)
    return frame.to_dict(orient="records")


def deadline_var_of(model):
    """The context variable a sparktune pyfunc reads its deadline from (None for other models)."""
    try:
        return getattr(model.unwrap_python_model(), "DEADLINE", None)
    except Exception:  # noqa: BLE001  (any model that is not ours: no deadline hook)
        return None


def _worker_main(conn, model_dir: str, model_config: dict | None) -> None:
    """A worker process: load the model, say ``ready`` (or why not), then score batches until told to stop."""
    # Ctrl-C reaches the whole process group; the server stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import mlflow

        model = mlflow.pyfunc.load_model(model_dir, model_config=model_config or None)
        deadline_var = deadline_var_of(model)
    except Exception as exc:  # noqa: BLE001  (reported to the server, which fails to start)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        if message is None:
            return
        texts, deadline = message
        try:
            answer: tuple[str, Any] = ("ok", score_records(model, deadline_var, texts, deadline))
        except TimeoutError as exc:  # the model's DeadlineExceeded
            answer = ("timeout", str(exc))
        except Exception as exc:  # noqa: BLE001  (handed to the batch's requests as a 500)
            answer = ("error", f"{type(exc).__name__}: {exc}")
        conn.send(answer)


@dataclass
class _Worker:
    process: Any
    conn: Any


class ModelProcesses:
    """``count`` worker processes, each with its own copy of the model, started (and their models
    loaded) before the server answers; ``score`` runs one batch on a free one. A worker that dies
    (killed, out of memory) fails its batch and is started again for the next one."""

    def __init__(self, model_dir: str, model_config: dict | None, count: int):
        import multiprocessing

        # spawn, not fork: the server's process holds torch's thread pools and uvicorn's loop.
        self._context = multiprocessing.get_context("spawn")
        self._args = (model_dir, model_config)
        self._free: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._workers = [self._spawn() for _ in range(count)]
        try:
            for worker in self._workers:
                self._await_ready(worker)
        except BaseException:
            self.close()
            raise
        for worker in self._workers:
            self._free.put(worker)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def _spawn(self) -> _Worker:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=_worker_main, args=(theirs, *self._args), daemon=True,
                                        name="sparktune-model")
        process.start()
        theirs.close()
        return _Worker(process, ours)

    def _await_ready(self, worker: _Worker) -> None:
        problem = None
        try:
            if not worker.conn.poll(_LOAD_TIMEOUT_S):
                problem = f"did not load the model within {_LOAD_TIMEOUT_S:g} s"
            else:
                kind, value = worker.conn.recv()
                if kind != "ready":
                    problem = f"could not load the model: {value}"
        except (EOFError, OSError):
            problem = f"exited while loading the model (exit code {worker.process.exitcode})"
        if problem:
            raise SparktuneError(f"a model worker process {problem}; see the log above, or serve with "
                                 "--batch-worker-kind thread")

    def _restart(self, worker: _Worker) -> _Worker:
        """A fresh process in a dead worker's place (the dead one stays listed if the fresh one fails to load)."""
        self._stop(worker)
        fresh = self._spawn()
        try:
            self._await_ready(fresh)
        except BaseException:
            self._stop(fresh)
            raise
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def score(self, texts: list[str], deadline: float) -> list[dict]:
        """Records of the model's answer for ``texts`` (``score_records``), computed in a worker process;
        TimeoutError when the deadline stopped it, RuntimeError when the model failed or its process died."""
        worker = self._free.get()
        try:
            if not worker.process.is_alive():
                worker = self._restart(worker)
            try:
                worker.conn.send((texts, deadline))
                kind, value = worker.conn.recv()
            except (EOFError, OSError) as exc:
                raise RuntimeError(f"a model worker process exited while scoring this batch (exit code "
                                   f"{worker.process.exitcode}); it is started again for the next batch") from exc
        finally:
            self._free.put(worker)
        if kind == "timeout":
            raise TimeoutError(value)
        if kind == "error":
            raise RuntimeError(value)
        return value

    @staticmethod
    def _stop(worker: _Worker) -> None:
        try:
            worker.conn.send(None)
        except (EOFError, OSError):
            pass
        worker.process.join(5)
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join(5)
        worker.conn.close()

    def close(self) -> None:
        for worker in self._workers:
            self._stop(worker)


def describe(kind: WorkerKind, workers: int, torch_threads: int | None) -> str:
    threads = f", {torch_threads} torch thread{'s' if torch_threads != 1 else ''} each" if torch_threads else ""
    where = "processes" if kind == WorkerKind.PROCESS else "threads"
    return f"micro-batching: {workers} batch worker {where}{threads}"
