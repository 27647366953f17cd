"""``sparktune serve`` and ``sparktune export-model``: the registered model, served and exported as is.

The model is the one artifact training logged (``sparktune.model.pyfunc``); serve loads that
MLflow folder unchanged, and export-model copies it unchanged, so ``sparktune serve``,
``mlflow models serve`` on the export, Databricks Model Serving and Azure ML answer alike.

The HTTP app is MLflow's own scoring app (``/ping``, ``/health``, ``/version``, ``/invocations``
with ``dataframe_split``, ``dataframe_records``, ``instances``, ``inputs``). In front of it
``ServeGuard`` (ASGI) adds what a public endpoint needs and MLflow lacks:

* a body size limit (413) and a body read timeout (408: a stalled upload is dropped);
* a rows-per-request limit (413);
* a request time limit (504): the request's deadline is handed to the model, whose batch loop
  stops at the next batch once it passes, so abandoned work does not run on;
* error answers without stack traces and without the request's content echoed back (MLflow's
  app puts both in its 4xx bodies); the trace goes to the server's log instead;
* JSON parsed once, up front, with bounds (nesting depth, digits of an integer): a hostile body
  is a 400, never a ``RecursionError`` or MLflow decoder ``ValueError`` turned 500.

Below the app, uvicorn's connection handling is bounded with uvicorn's own settings
(``timeout_keep_alive``: idle keep-alive connections; ``limit_concurrency``: 503 past N
connections or tasks; ``h11_max_incomplete_event_size``: the largest request head)
plus ``GuardedH11Protocol`` (uvicorn's h11 protocol, subclassed) for the two things uvicorn has
no setting for: a deadline on each request head (slow or stalled heads are dropped with 408)
and a hard cap on held sockets (connections past it are answered 503 and closed at once).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from sparktune.env import env_value
from sparktune.errors import SparktuneError
from sparktune.results import StageResult
from sparktune.serve_workers import (
    ModelProcesses,
    WorkerKind,
    choose_worker_kind,
    deadline_var_of,
    describe,
    model_bytes,
    score_records,
)
from sparktune.settings import Stage, add_stage

__all__ = [
    "ExportModelSettings",
    "ExportResult",
    "ServeGuard",
    "ServeLimits",
    "ServeResult",
    "ServeSettings",
    "add_cli",
    "build_app",
    "export_model",
    "load_options",
    "export_model_stage",
    "prepare_serving_model",
    "serve",
    "serve_stage",
]

# Past this many bytes an oversized body is no longer read (to answer 413 on a clean
# connection); the connection is closed instead.
_DRAIN_LIMIT = 64 * 1024 * 1024
_MAX_MESSAGE = 1000


# Deeper JSON than this is no scoring payload (the deepest, dataframe_split, is 4 levels); the
# bound keeps every later walk of the parsed body (ours, MLflow's, pandas') far from Python's
# recursion limit.
MAX_JSON_DEPTH = 32
# Each batched answer says how many rows its forward pass scored (observability, and the tests).
BATCH_ROWS_HEADER = b"x-sparktune-batch-rows"


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 10 * 1024 * 1024
    max_rows: int = 1000
    request_timeout_s: float = 60.0
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    max_connections: int = 128
    max_header_bytes: int = 64 * 1024
    max_text_chars: int = 100_000
    # Micro-batching, on by default: up to 32 rows per forward pass, no batch window (0 ms), two
    # batches computing at once, each with cores/2 torch threads (batch_worker_kind). The measured best
    # on this 2-core CPU (BENCHMARKS.md, model server, issue 21 item 4, "light client" runs; a load
    # generator of raw keep-alive connections, arms interleaved, medians of 2-3 rounds, three runs):
    # 1.82x, 1.82x, 2.24x `mlflow models serve`'s requests/s at 8 clients and 2.20x, 2.29x, 3.19x at 32,
    # p99 0.5x-0.8x of its own, its own rounds within 6-16% of each other. In the same run (D) one
    # worker with a 5 ms window gave 1.8x / 2.7x and two workers with a 5 ms window 1.6x / 1.9x: with
    # two workers a window makes a free worker wait for companions while the other computes (a core
    # idles); with none it takes what queued during the other's pass, which is the batching. Two
    # one-thread passes at once beat one two-thread pass on these small inputs (a review is at most a
    # few hundred tokens).
    # batch_max_rows 0: each request alone through MLflow's app.
    batch_max_rows: int = 32
    # No request waits longer than this past its arrival for companions (0: none; a batch holds what
    # queued while the workers were busy).
    batch_wait_ms: float = 0.0
    # Batches computed at once, each with cores/workers torch threads.
    batch_workers: int = 2
    # Where each batch worker runs: auto picks a process of its own (its own model copy and interpreter
    # lock) for several workers on a CPU when every copy fits in half the available memory, else a thread
    # (``sparktune.serve_workers``; behind HTTP on this CPU: 1.12-1.14x two threads' requests/s at 8
    # clients, 1.10-1.17x at 32, and 2.12x / 2.76x `mlflow models serve`, BENCHMARKS.md).
    batch_worker_kind: WorkerKind = WorkerKind.AUTO

    def check(self) -> None:
        problems = [f"{flag} must be > 0, got {value}" for flag, value in (
            ("--max-body-mb", self.max_body_bytes), ("--max-rows", self.max_rows),
            ("--request-timeout", self.request_timeout_s), ("--body-timeout", self.body_timeout_s),
            ("--header-timeout", self.header_timeout_s), ("--keep-alive", self.keep_alive_s),
            ("--max-connections", self.max_connections), ("--max-header-kb", self.max_header_bytes),
            ("--max-text-chars", self.max_text_chars), ("--batch-workers", self.batch_workers)) if value <= 0]
        problems += [f"{flag} must be >= 0, got {value}" for flag, value in (
            ("--batch-max-rows", self.batch_max_rows), ("--batch-wait-ms", self.batch_wait_ms)) if value < 0]
        if problems:
            raise SparktuneError("; ".join(problems))


@dataclass
class ExportResult(StageResult):
    model_uri: str
    output: str

    def summary(self) -> str:
        return (f"MLflow model written to {self.output} (the registered artifact as is: MLmodel with signature, "
                f"requirements.txt, code, weights)\ntry it: mlflow models serve -m {self.output} --env-manager local "
                "--port 5001")


def prepare_serving_model(model_uri, tracker=None, work_dir: str | None = None) -> str:
    """The local MLflow model folder to serve: the logged pyfunc as is; a bare save_pretrained
    folder is wrapped into the same pyfunc."""
    from sparktune.model import artifact
    from sparktune.model.resolve import ModelKind, ResolvedModel, resolve_model

    resolved = model_uri if isinstance(model_uri, ResolvedModel) else resolve_model(model_uri, tracker, work_dir)
    if resolved.kind is ModelKind.PYFUNC:
        return resolved.local_dir
    out = os.path.join(work_dir or tempfile.mkdtemp(prefix="sparktune-serve-"), "mlflow_model")
    return artifact.save_model(resolved.hf_dir, out, resolved.task)


def export_model(model_uri: str, output: str, tracker=None) -> ExportResult:
    """Copy the model's MLflow folder (what Databricks Model Serving / Azure ML deploy) to ``output``."""
    if os.path.exists(output) and os.listdir(output):
        raise SparktuneError(f"--output {output} exists and is not empty; give a new folder")
    with tempfile.TemporaryDirectory(prefix="sparktune-export-") as work:
        path = prepare_serving_model(model_uri, tracker, work)
        if os.path.exists(output):
            os.rmdir(output)
        shutil.copytree(path, output)
    return ExportResult(str(model_uri), output)


# Request checks ---------------------------------------------------------------------------------

def _text_type_problem(payload) -> str | None:
    """Where a scoring payload carries text that is not a string (MLflow would turn a number
    into the string "5" and score it; a client sending numbers has a bug worth a 400)."""

    def bad(value, where):
        if not isinstance(value, str):
            return f"{where}: expected the text as a string, found {type(value).__name__}"
        return None

    if not isinstance(payload, dict):
        return None  # MLflow's own check answers these with a clear 400
    if isinstance(payload.get("dataframe_split"), dict):
        split = payload["dataframe_split"]
        columns, data = split.get("columns"), split.get("data")
        if not isinstance(data, list):
            return "dataframe_split.data: expected a list of rows, e.g. [[\"A great film\"]]"
        col = (columns.index("text") if isinstance(columns, list) and "text" in columns
               else (0 if not columns or len(columns) == 1 else None))
        for i, row in enumerate(data):
            if col is None:
                break
            value = row[col] if isinstance(row, list) and len(row) > col else row
            problem = bad(value, f"dataframe_split.data[{i}]")
            if problem:
                return problem
    elif isinstance(payload.get("dataframe_records"), list):
        for i, record in enumerate(payload["dataframe_records"]):
            if not isinstance(record, dict):
                return f"dataframe_records[{i}]: expected an object like {{\"text\": \"A great film\"}}"
            if "text" in record:
                problem = bad(record["text"], f"dataframe_records[{i}].text")
                if problem:
                    return problem
    else:
        for key in ("inputs", "instances"):
            if key not in payload:
                continue
            value = payload[key]
            if isinstance(value, dict) and "text" in value:
                value = value["text"]
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, dict) and "text" in item:
                    item = item["text"]
                problem = bad(item, f"{key}[{i}]")
                if problem:
                    return problem
    return None


def _nested_deeper_than(payload, limit: int) -> bool:
    """Whether lists/objects nest past ``limit`` levels (iterative: no recursion on hostile input)."""
    stack = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


_JSON_EXAMPLE = 'send e.g. {"inputs": ["A great film", "A dull film"]}'


def parse_json_body(body: bytes) -> tuple[object, str | None]:
    """The parsed scoring payload, or None and the reason it is refused (a 400)."""
    too_deep = (f"the JSON nests lists or objects deeper than this server accepts ({MAX_JSON_DEPTH} levels); "
                + _JSON_EXAMPLE)
    try:
        payload = json.loads(body)
    except RecursionError:  # json's C scanner gives up near Python's recursion limit
        return None, too_deep
    except UnicodeDecodeError:
        return None, f"the body is not valid JSON: it is not UTF-8 text; {_JSON_EXAMPLE}"
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # Python's cap on an int's decimal digits
            return None, (f"the JSON holds an integer longer than {sys.get_int_max_str_digits()} digits; "
                          "scoring payloads carry text, " + _JSON_EXAMPLE)
        # json's messages give a position only (no content of the body).
        return None, f"the body is not valid JSON ({exc}); {_JSON_EXAMPLE}"
    if isinstance(payload, (dict, list)) and _nested_deeper_than(payload, MAX_JSON_DEPTH):
        return None, too_deep
    return payload, None


def _longest_string(payload) -> int:
    """Characters in the longest string of a parsed payload (iterative, like the depth check)."""
    longest, stack = 0, [payload]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            longest = max(longest, len(value))
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return longest


def _row_count(payload) -> int:
    """Rows in a JSON scoring payload (0 when its shape is unknown: MLflow then answers 400)."""
    if not isinstance(payload, dict):
        return 0
    split = payload.get("dataframe_split")
    if isinstance(split, dict) and isinstance(split.get("data"), list):
        return len(split["data"])
    for key in ("dataframe_records", "inputs", "instances"):
        value = payload.get(key)
        if isinstance(value, list):
            return len(value)
        if isinstance(value, dict):
            return max((len(v) for v in value.values() if isinstance(v, list)), default=1)
    return 0


def _strings_in(payload, found: list, limit: int = 10000) -> list:
    if len(found) >= limit:
        return found
    if isinstance(payload, str):
        if len(payload) >= 4:
            found.append(payload)
    elif isinstance(payload, dict):
        for key, value in payload.items():
            _strings_in(key, found, limit)
            _strings_in(value, found, limit)
    elif isinstance(payload, list):
        for value in payload:
            _strings_in(value, found, limit)
    return found


def clean_message(message: str, body: bytes) -> str:
    """An error message without the request's content: MLflow appends the raw body
    (``Input: ...``) to parse errors and the parsed data (``Failed to predict data '...'``) to
    prediction errors."""
    message = re.sub(r"\s*Input:\s*\n.*\Z", "", str(message), flags=re.DOTALL)
    message = re.sub(r"^Failed to predict data .*?\nError: ", "", message, flags=re.DOTALL)
    text = body.decode("utf-8", errors="replace")
    try:
        strings = _strings_in(json.loads(text), [])
    except ValueError:
        strings = [text] if len(text) >= 4 else []
    for value in sorted(set(strings), key=len, reverse=True):
        if value in message:
            message = message.replace(value, "<request content>")
    # Long runs of the body that survived (a repr of a truncated string, say) go too.
    for start in range(0, max(0, len(text) - 32), 16):
        chunk = text[start:start + 32]
        if chunk in message:
            message = message.replace(chunk, "<request content>")
    return message[:_MAX_MESSAGE]


def batchable_texts(payload) -> list[str] | None:
    """The texts of a plain scoring payload (one of the four formats, a non-empty list of strings
    in a ``text`` column, no params), or None: anything else takes MLflow's own path, with its
    own messages."""
    from sparktune.model.pyfunc import TEXT_COLUMN

    if not isinstance(payload, dict) or len(payload) != 1:
        return None
    ((key, value),) = payload.items()
    rows: list | None = None
    if key in ("inputs", "instances"):
        if isinstance(value, dict) and list(value) == [TEXT_COLUMN]:
            value = value[TEXT_COLUMN]
        rows = value if isinstance(value, list) else None
    elif key == "dataframe_split" and isinstance(value, dict) and value.get("columns", [TEXT_COLUMN]) == [TEXT_COLUMN] \
            and set(value) <= {"columns", "data"} and isinstance(value.get("data"), list):
        data = value["data"]
        rows = [row[0] for row in data] if all(isinstance(row, list) and len(row) == 1 for row in data) else None
    elif key == "dataframe_records" and isinstance(value, list):
        ok = all(isinstance(record, dict) and list(record) == [TEXT_COLUMN] for record in value)
        rows = [record[TEXT_COLUMN] for record in value] if ok else None
    if not rows or not all(isinstance(row, str) for row in rows):
        return None
    return rows


@dataclass
class _Waiting:
    texts: list[str]
    arrival: float
    deadline: float
    future: asyncio.Future


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    largest: int = 0


class MicroBatcher:
    """Concurrent requests, scored together: one model call per batch.

    A batch closes when it holds ``max_rows`` rows or ``max_wait_s`` after its oldest request
    arrived, whichever comes first (a request bigger than ``max_rows`` goes alone; requests are
    never split). ``workers`` batches run at once, each on its own worker thread (1: one at a
    time; torch already spreads a forward pass over every core, so concurrent passes that each use
    every core only contend, as in MLflow's app, one thread per request; with W workers the server
    gives each pass cores/W torch threads instead), or with ``processes`` each handed by its thread
    to a worker process of its own (``sparktune.serve_workers``). The model's core orders the
    batch's rows by length before padding (``sparktune.model.hf``), and the answers are sliced back
    to their requests in arrival order.
    The batch's deadline is its latest request's; each request still answers 504 at its own.
    """

    def __init__(self, model, max_rows: int, max_wait_s: float, deadline_var=None, workers: int = 1,
                 processes: ModelProcesses | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.model = model
        # Worker processes compute the batches (each thread of the pool below then only waits on one).
        self.processes = processes
        self.workers = max(1, int(workers))
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.deadline_var = deadline_var
        self.stats = BatchStats()
        self._queue: deque[_Waiting] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="sparktune-batch")

    async def predict(self, texts: list[str], deadline: float):
        """(this request's rows of the model's answer, one record per row, the rows in its batch)."""
        loop = asyncio.get_running_loop()
        if self._worker is None:
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._run())
        assert self._wakeup is not None
        waiting = _Waiting(texts, time.monotonic(), deadline, loop.create_future())
        self._queue.append(waiting)
        self._wakeup.set()
        return await waiting.future

    def _queued_rows(self) -> int:
        return sum(len(w.texts) for w in self._queue if not w.future.done())

    async def _run(self) -> None:
        assert self._wakeup is not None
        free = asyncio.Semaphore(self.workers)
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # A batch is formed only once a worker is free: requests arriving meanwhile join it.
            await free.acquire()
            # Wait for more rows, up to max_wait_s past the oldest arrival.
            close_at = self._queue[0].arrival + self.max_wait_s
            while self._queued_rows() < self.max_rows and (left := close_at - time.monotonic()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
            batch: list[_Waiting] = []
            rows = 0
            while self._queue and (not batch or rows + len(self._queue[0].texts) <= self.max_rows):
                waiting = self._queue.popleft()
                if not waiting.future.done():  # done: timed out or the client left while queued
                    batch.append(waiting)
                    rows += len(waiting.texts)
            if not batch:
                free.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run_batch(batch, rows))
            self._running.add(task)
            task.add_done_callback(self._finished(free))

    def _finished(self, free: asyncio.Semaphore):
        def done(task: asyncio.Task) -> None:
            self._running.discard(task)
            free.release()
        return done

    async def _run_batch(self, batch: list[_Waiting], rows: int) -> None:
        texts = [text for waiting in batch for text in waiting.texts]
        try:
            records = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._score, texts, max(w.deadline for w in batch))
        except Exception as exc:  # noqa: BLE001  (handed to each request of the batch)
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
            return
        self.stats.batches += 1
        self.stats.rows += rows
        self.stats.largest = max(self.stats.largest, rows)
        start = 0
        for waiting in batch:
            part = records[start:start + len(waiting.texts)]
            start += len(waiting.texts)
            if not waiting.future.done():
                waiting.future.set_result((part, rows))

    def _score(self, texts: list[str], deadline: float) -> list[dict]:
        """The model's answer for ``texts`` as one record (a dict of columns) per row: made on the
        worker thread (or in a worker process), once per batch; slicing a list per request on the
        event loop is ~100x cheaper than slicing and serializing a DataFrame there (measured,
        BENCHMARKS.md)."""
        if self.processes is not None:
            return self.processes.score(texts, deadline)
        return score_records(self.model, self.deadline_var, texts, deadline)

    def close(self) -> None:
        """Stop the worker processes (if any) and the worker threads."""
        if self.processes is not None:
            self.processes.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


class ServeGuard:
    """ASGI middleware in front of MLflow's scoring app (see the module docstring)."""

    def __init__(self, app, limits: ServeLimits, deadline_var=None, batcher: MicroBatcher | None = None):
        self.app = app
        self.limits = limits
        self.deadline_var = deadline_var
        self.batcher = batcher

    @staticmethod
    async def _answer(send, status: int, message: str, code: str) -> None:
        body = json.dumps({"error_code": code, "message": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    def _too_large(self, size_text: str) -> str:
        return (f"request body is {size_text}, over this server's limit of {self.limits.max_body_bytes} bytes; "
                "send fewer rows per request (or restart the server with a larger --max-body-mb)")

    async def _drain(self, receive, deadline: float) -> bool:
        # Read and drop the rest so the client, still sending, gets the 413 rather than a reset
        # connection; past _DRAIN_LIMIT (or the body deadline) stop reading and close.
        seen = 0
        while seen <= _DRAIN_LIMIT:
            try:
                message = await asyncio.wait_for(receive(), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                return False
            if message["type"] != "http.request":
                return False
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
        return True

    async def _read_body(self, receive, send, declared: int | None) -> bytes | None:
        """The whole body, or None after answering 408/413 (or when the client left)."""
        deadline = time.monotonic() + self.limits.body_timeout_s
        if declared is not None and declared > self.limits.max_body_bytes:
            if await self._drain(receive, deadline):
                await self._answer(send, 413, self._too_large(f"{declared} bytes"), "REQUEST_LIMIT_EXCEEDED")
            return None
        chunks, total = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                await self._answer(send, 408, f"the request body did not arrive within {self.limits.body_timeout_s:g} "
                                              "s; send it at once (the server drops stalled uploads)",
                                   "REQUEST_TIMEOUT")
                return None
            if message["type"] != "http.request":
                return None  # the client went away
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.limits.max_body_bytes:
                if not message.get("more_body", False) or await self._drain(receive, deadline):
                    await self._answer(send, 413, self._too_large(f"over {self.limits.max_body_bytes} bytes"),
                                       "REQUEST_LIMIT_EXCEEDED")
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _check(self, scope, headers: dict, body: bytes) -> tuple[tuple[int, str, str] | None, object]:
        """(the refusal to answer, or None; the parsed JSON payload, or None)."""
        if scope.get("path") != "/invocations":
            return None, None
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        rows = longest = 0
        payload = None
        if content_type == b"application/json":
            payload, problem = parse_json_body(body)
            if problem:
                return (400, problem, "BAD_REQUEST"), None
            problem = _text_type_problem(payload)
            if problem:
                return (400, problem, "BAD_REQUEST"), None
            rows = _row_count(payload)
            longest = _longest_string(payload)
        elif content_type == b"text/csv":
            rows = max(0, body.count(b"\n") - 1)
            longest = max(map(len, body.split(b"\n")), default=0)
        if longest > self.limits.max_text_chars:
            # The tokenizer reads a text whole before truncating it: a 10 MB text costs tens of
            # seconds and hundreds of MB for tokens that are then dropped.
            message = (f"a text of the request has {longest} characters, over this server's limit of "
                       f"{self.limits.max_text_chars} characters per text; the model reads only its first tokens, "
                       "so send the start of the text")
            return (413, message, "REQUEST_LIMIT_EXCEEDED"), None
        if rows > self.limits.max_rows:
            message = (f"the request has {rows} rows, over this server's limit of {self.limits.max_rows} rows per "
                       "request; split it into smaller requests")
            return (413, message, "REQUEST_LIMIT_EXCEEDED"), None
        return None, payload

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        size = None
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await self._answer(send, 400, "Content-Length is not a number", "BAD_REQUEST")
        body = await self._read_body(receive, send, size)
        if body is None:
            return
        refused, payload = self._check(scope, headers, body)
        if refused:
            return await self._answer(send, *refused)
        texts = batchable_texts(payload) if self.batcher is not None else None
        if texts is not None:
            return await self._batched(texts, send)
        await self._call_app(scope, body, receive, send)

    async def _batched(self, texts: list[str], send) -> None:
        """Answer through the micro-batcher: MLflow's JSON for these rows, computed in one forward
        pass with whatever else arrived within the batch window."""
        from mlflow.utils.proto_json_utils import NumpyEncoder

        assert self.batcher is not None
        timeout = self.limits.request_timeout_s
        try:
            records, batch_rows = await asyncio.wait_for(self.batcher.predict(texts, time.monotonic() + timeout),
                                                         timeout)
        except TimeoutError:  # also the model's DeadlineExceeded (a TimeoutError)
            return await self._answer(send, 504, f"the request took longer than this server's limit of {timeout:g} s "
                                                 "and was stopped; send fewer rows per request", "REQUEST_TIMEOUT")
        except Exception as exc:  # noqa: BLE001  (the model failed: logged here, a clean 500 out)
            print(f"batched prediction failed: {exc!r}", file=sys.stderr, flush=True)
            return await self._answer(send, 500, "the model failed on this batch; see the server's log",
                                      "INTERNAL_ERROR")
        # The bytes MLflow's predictions_to_json writes for these rows (json.dump of the same dict, same encoder).
        body = json.dumps({"predictions": records}, cls=NumpyEncoder).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (BATCH_ROWS_HEADER, str(batch_rows).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _call_app(self, scope, body: bytes, receive, send) -> None:
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        state: dict[str, Any] = {"started": False, "status": 200, "headers": [], "error_body": []}

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                state["status"] = int(message["status"])
                if state["status"] < 400:
                    state["started"] = True
                    return await send(message)
                state["headers"] = message.get("headers") or []
                return None
            if state["status"] < 400:
                return await send(message)
            state["error_body"].append(message.get("body", b""))
            if not message.get("more_body", False):
                await self._send_clean_error(send, state, body)
            return None

        timeout = self.limits.request_timeout_s
        # The model's batch loop reads this deadline (a context variable, copied into the worker
        # thread MLflow predicts in) and stops once it passes.
        token = self.deadline_var.set(time.monotonic() + timeout) if self.deadline_var is not None else None
        try:
            await asyncio.wait_for(self.app(scope, replay, guarded_send), timeout)
        except TimeoutError:
            if not state["started"]:
                await self._answer(send, 504, f"the request took longer than this server's limit of {timeout:g} s "
                                              "and was stopped; send fewer rows per request", "REQUEST_TIMEOUT")
        finally:
            if token is not None:
                self.deadline_var.reset(token)

    async def _send_clean_error(self, send, state, request_body: bytes) -> None:
        status = state["status"]
        raw = b"".join(state["error_body"])
        try:
            parsed = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            parsed = None
        if isinstance(parsed, dict):
            trace = parsed.pop("stack_trace", None)
            if trace:
                print(f"request failed ({status}):\n{trace}", file=sys.stderr, flush=True)
            message = clean_message(parsed.get("message", ""), request_body)
            if "DeadlineExceeded" in str(trace or "") or "ran past its time limit" in message:
                return await self._answer(send, 504, "the request took longer than this server's limit of "
                                                     f"{self.limits.request_timeout_s:g} s and was stopped",
                                          "REQUEST_TIMEOUT")
            payload = {"error_code": parsed.get("error_code", "BAD_REQUEST"), "message": message}
            return await self._answer(send, status, payload["message"], payload["error_code"])
        text = clean_message(raw.decode("utf-8", errors="replace"), request_body)
        out = text.encode()
        headers = [(k, v) for k, v in state["headers"] if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": status,
                    "headers": headers + [(b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})


def _raw_answer(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 response, for the protocol layer (no ASGI app is involved yet)."""
    body = json.dumps({"error_code": "REQUEST_TIMEOUT" if status == 408 else "TEMPORARILY_UNAVAILABLE",
                       "message": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def guarded_protocol(limits: ServeLimits):
    """uvicorn's h11 protocol with a deadline on each request head and a cap on held sockets.

    uvicorn times out idle keep-alive connections (``timeout_keep_alive``) but nothing between
    a connection's first byte and the end of its request head: a client that sends half a head
    and stalls holds its socket forever. Here each head (the first on a connection, or the next
    one on a kept-alive connection, from its first byte) must be complete within
    ``header_timeout_s``, else the server answers 408 and closes. ``limit_concurrency`` only
    answers 503 once a head is complete, so a connection past ``max_connections`` is answered
    503 and closed as soon as it is accepted.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                transport.write(_raw_answer(503, "Service Unavailable",
                                            f"the server holds its limit of {limits.max_connections} "
                                            "connections; retry shortly"))
                transport.close()
                return
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                self._cancel_head_timer()  # the head is complete (or the connection is done)
            else:
                self._arm_head_timer()  # a head has started: its clock runs from this first byte

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            self.transport.write(_raw_answer(408, "Request Timeout",
                                             f"the request head did not arrive within {limits.header_timeout_s:g} s; "
                                             "send the whole request at once"))
            self.transport.close()

    return GuardedH11Protocol


def uvicorn_settings(limits: ServeLimits) -> dict:
    """uvicorn's own settings for the connection bounds (all present in uvicorn 0.37, the
    Databricks Runtime 17.3 LTS ML version, and in today's)."""
    return {
        "http": guarded_protocol(limits),
        "timeout_keep_alive": limits.keep_alive_s,
        "limit_concurrency": limits.max_connections,
        "h11_max_incomplete_event_size": limits.max_header_bytes,
    }


def load_options(mlflow_model_dir: str, options: dict) -> dict:
    """``options`` (the pyfunc's load-time keys: ``sparktune.model.pyfunc.LOAD_OPTIONS``), checked
    against the model: MLflow silently ignores a key its MLmodel was not logged with, and a model
    logged before sparktune passed these at load has none of them."""
    from mlflow.models import Model
    from mlflow.models.model import MODEL_CONFIG

    options = {key: value for key, value in options.items() if value is not None}
    if not options:
        return {}
    flavor = Model.load(os.path.join(mlflow_model_dir, "MLmodel")).flavors.get("python_function", {})
    missing = sorted(set(options) - set(flavor.get(MODEL_CONFIG) or {}))
    if missing:
        raise SparktuneError(f"the model at {mlflow_model_dir} takes no load-time {', '.join(missing)} (it was "
                             "logged before sparktune passed these through MLflow's model_config, or it is not a "
                             "sparktune model); log it again with this version, or leave the option out")
    return options


def batch_worker_kind(limits: ServeLimits, mlflow_model_dir: str) -> WorkerKind:
    """Threads or processes for the batch workers (``serve_workers.choose_worker_kind``), from this machine."""
    import psutil

    from sparktune.model import hf

    if limits.batch_max_rows <= 0:
        return WorkerKind.THREAD
    return choose_worker_kind(limits.batch_worker_kind, limits.batch_workers, hf.device_for(None),
                              model_bytes(mlflow_model_dir), psutil.virtual_memory().available)


def build_app(mlflow_model_dir: str, limits: ServeLimits, model_config: dict | None = None):
    """MLflow's scoring app for the model, behind ``ServeGuard``; ``model_config``: load-time
    options of the pyfunc (``sparktune.model.pyfunc.LOAD_OPTIONS``), handed to MLflow's
    ``load_model`` and read by the model's ``load_context`` (in each worker process too)."""
    import mlflow
    from mlflow.pyfunc import scoring_server

    # MLflow's own timeout (it answers 504 but lets the work run on) must not fire before ours.
    os.environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(int(limits.request_timeout_s) + 30)
    options = load_options(mlflow_model_dir, model_config or {}) or None
    model = mlflow.pyfunc.load_model(mlflow_model_dir, model_config=options)
    deadline_var = deadline_var_of(model)
    batcher = None
    if limits.batch_max_rows > 0:
        processes = (ModelProcesses(mlflow_model_dir, options, limits.batch_workers)
                     if batch_worker_kind(limits, mlflow_model_dir) == WorkerKind.PROCESS else None)
        batcher = MicroBatcher(model, limits.batch_max_rows, limits.batch_wait_ms / 1000, deadline_var,
                               limits.batch_workers, processes)
    return ServeGuard(scoring_server.init(model), limits, deadline_var, batcher)


def serve(model_uri: str, tracker=None, host: str = "127.0.0.1", port: int = 5000,
          limits: ServeLimits | None = None, bf16: str | None = None, quantize: str | None = None,
          torch_threads: int | None = None) -> None:
    """``bf16``: auto, true or false (None: the server's ``$SPARKTUNE_BF16``, else auto), ``quantize``
    (none or int8; None: none) and ``torch_threads`` (None: the CPU's cores shared among the batch
    workers when there are several, else torch's default), handed to the model as load-time options
    (MLflow's ``model_config``)."""
    import uvicorn

    limits = limits or ServeLimits()
    limits.check()
    if not 0 < port < 65536:
        raise SparktuneError(f"--port must be 1..65535, got {port}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: the endpoint has no authentication; put it behind one", file=sys.stderr)
    if torch_threads is not None and torch_threads <= 0:
        raise SparktuneError(f"--torch-threads must be > 0, got {torch_threads}")
    if torch_threads is None and limits.batch_max_rows > 0 and limits.batch_workers > 1:
        torch_threads = max(1, (os.cpu_count() or 1) // limits.batch_workers)
    model_dir = prepare_serving_model(model_uri, tracker)
    app = build_app(model_dir, limits, {"bf16": bf16, "quantize": quantize, "torch_threads": torch_threads})
    batcher = app.batcher
    if batcher is not None:
        kind = WorkerKind.PROCESS if batcher.processes is not None else WorkerKind.THREAD
        print(describe(kind, limits.batch_workers, torch_threads), flush=True)
    print(f"serving {model_uri} on http://{host}:{port} (routes: /ping /health /version /invocations)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level=str(env_value("SPARKTUNE_SERVE_LOG_LEVEL")),
                    **uvicorn_settings(limits))
    finally:
        if batcher is not None:
            batcher.close()


# CLI ---------------------------------------------------------------------------------------------

_LIMITS = ServeLimits()


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    """``sparktune serve``'s flags (the limits' defaults are ``ServeLimits``')."""

    model: str
    """models:/<name>@<alias>, runs:/<run_id>/model, models:/m-<id> or a model folder."""
    host: str = "127.0.0.1"
    """Interface to bind (127.0.0.1: this machine only)."""
    port: int = 5000
    """Port to listen on."""
    max_body_mb: float = _LIMITS.max_body_bytes / 1024 / 1024
    """Largest request body accepted, in MB (413 above)."""
    max_rows: int = _LIMITS.max_rows
    """Most rows per request (413 above)."""
    request_timeout: float = _LIMITS.request_timeout_s
    """Seconds a request may compute before it is stopped and answered 504."""
    body_timeout: float = _LIMITS.body_timeout_s
    """Seconds a client has to send the whole body before 408."""
    header_timeout: float = _LIMITS.header_timeout_s
    """Seconds a client has to send a request's whole head (line and headers) before the connection is answered 408
    and closed."""
    keep_alive: float = _LIMITS.keep_alive_s
    """Seconds an idle keep-alive connection is held."""
    max_connections: int = _LIMITS.max_connections
    """Most connections held at once; past it a request or a new connection gets 503."""
    max_header_kb: float = _LIMITS.max_header_bytes / 1024
    """Largest request head, in KB (400 above)."""
    max_text_chars: int = _LIMITS.max_text_chars
    """Longest text accepted, in characters (413 above: the model reads only a text's first tokens)."""
    batch_max_rows: int = _LIMITS.batch_max_rows
    """Micro-batching: concurrent requests are scored together in one forward pass of up to this many rows (0: one
    pass per request, through MLflow's app)."""
    batch_wait_ms: float = _LIMITS.batch_wait_ms
    """Micro-batching: a batch closes at most this long after its first request arrived."""
    batch_workers: int = _LIMITS.batch_workers
    """Micro-batching: batches computed at once, each with cores/N torch threads (unless --torch-threads says
    otherwise)."""
    batch_worker_kind: Literal["auto", "process", "thread"] = _LIMITS.batch_worker_kind.value
    """Micro-batching: where each batch worker runs. process: a process of its own with its own copy of the model
    (no shared interpreter lock; N+1 copies in memory); thread: a thread of the server (one copy); auto: processes
    for several workers on a CPU when every copy fits in half the available memory, else threads."""
    torch_threads: int | None = None
    """Torch threads of the server (empty: cores / --batch-workers when batching, else torch's default)."""
    quantize: Literal["none", "int8"] | None = None
    """int8: run the model's Linear layers dynamically quantized to int8 (CPU; a small accuracy change, see
    BENCHMARKS.md); empty or none: as trained."""
    bf16: Literal["auto", "true", "false"] | None = None
    """Run the model in bfloat16: auto (on where bf16 is faster than fp32: a GPU with bf16, a CPU with AMX), true
    or false; empty: $SPARKTUNE_BF16, else auto."""

    def limits(self) -> ServeLimits:
        return ServeLimits(int(self.max_body_mb * 1024 * 1024), self.max_rows, self.request_timeout,
                           self.body_timeout, self.header_timeout, self.keep_alive, self.max_connections,
                           int(self.max_header_kb * 1024), self.max_text_chars, self.batch_max_rows,
                           self.batch_wait_ms, self.batch_workers, WorkerKind(self.batch_worker_kind))


@dataclass
class ServeResult(StageResult):
    """What ``sparktune serve`` served, once the server has stopped."""

    model_uri: str
    url: str

    def summary(self) -> str:
        return f"stopped serving {self.model_uri} on {self.url}"


class _Stopped(Exception):
    """SIGTERM, re-raised by uvicorn once it has shut down."""


def serve_stage(spark, settings: ServeSettings, tracker=None) -> ServeResult:
    """``sparktune serve``: serves until stopped (Ctrl-C, SIGTERM), then returns (no Spark: ``spark`` is unused).

    uvicorn shuts down gracefully on SIGINT/SIGTERM and then raises the signal again with the
    handler it found; the one set here turns that into a return, so the result is still printed.
    """
    import signal
    import threading

    def stopped(signum, frame):
        raise _Stopped

    s = settings
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stopped) if main_thread else None
    try:
        serve(s.model, tracker, host=s.host, port=s.port, limits=s.limits(), bf16=s.bf16, quantize=s.quantize,
              torch_threads=s.torch_threads)
    except (KeyboardInterrupt, _Stopped):
        pass
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return ServeResult(s.model, f"http://{s.host}:{s.port}")


@dataclass(frozen=True, kw_only=True)
class ExportModelSettings:
    """``sparktune export-model``'s flags."""

    model: str
    """A model URI or folder, as for serve."""
    output: str
    """New folder to write."""


def export_model_stage(spark, settings: ExportModelSettings, tracker=None) -> ExportResult:
    """``sparktune export-model`` (no Spark: ``spark`` is unused)."""
    return export_model(settings.model, settings.output, tracker)


def add_cli(subparsers) -> None:
    add_stage(subparsers, Stage(
        "serve", ServeSettings, serve_stage, spark=False, tracker=True,
        help="serve a model over HTTP with MLflow's scoring server (/ping, /health, /invocations)",
        description="Serve the model: POST text to /invocations, get label and class probabilities (or generated "
                    "text and loss) back."))
    add_stage(subparsers, Stage(
        "export-model", ExportModelSettings, export_model_stage, spark=False, tracker=True,
        help="write the MLflow model folder for Databricks Model Serving / Azure ML",
        description="Copy the registered model (a self-contained MLflow pyfunc) to a folder."))
