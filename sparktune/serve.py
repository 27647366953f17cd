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
  app puts both in its 4xx bodies); the trace goes to the server's log instead.
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
from dataclasses import dataclass

from sparktune.errors import SparktuneError
from sparktune.model.hf import BF16_ENV
from sparktune.results import StageResult

__all__ = [
    "ExportResult",
    "ServeGuard",
    "ServeLimits",
    "add_cli",
    "build_app",
    "export_model",
    "prepare_serving_model",
    "serve",
]

# Past this many bytes an oversized body is no longer read (to answer 413 on a clean
# connection); the connection is closed instead.
_DRAIN_LIMIT = 64 * 1024 * 1024
_MAX_MESSAGE = 1000


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 10 * 1024 * 1024
    max_rows: int = 1000
    request_timeout_s: float = 60.0
    body_timeout_s: float = 30.0

    def check(self) -> None:
        problems = [f"{flag} must be > 0, got {value}" for flag, value in (
            ("--max-body-mb", self.max_body_bytes), ("--max-rows", self.max_rows),
            ("--request-timeout", self.request_timeout_s), ("--body-timeout", self.body_timeout_s)) if value <= 0]
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


class ServeGuard:
    """ASGI middleware in front of MLflow's scoring app (see the module docstring)."""

    def __init__(self, app, limits: ServeLimits, deadline_var=None):
        self.app = app
        self.limits = limits
        self.deadline_var = deadline_var

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

    def _check(self, scope, headers: dict, body: bytes) -> tuple[int, str, str] | None:
        if scope.get("path") != "/invocations":
            return None
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        rows = 0
        if content_type == b"application/json":
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                return None  # MLflow answers 400 (its message is cleaned on the way out)
            problem = _text_type_problem(payload)
            if problem:
                return 400, problem, "BAD_REQUEST"
            rows = _row_count(payload)
        elif content_type == b"text/csv":
            rows = max(0, body.count(b"\n") - 1)
        if rows > self.limits.max_rows:
            message = (f"the request has {rows} rows, over this server's limit of {self.limits.max_rows} rows per "
                       "request; split it into smaller requests")
            return 413, message, "REQUEST_LIMIT_EXCEEDED"
        return None

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
        refused = self._check(scope, headers, body)
        if refused:
            return await self._answer(send, *refused)
        await self._call_app(scope, body, receive, send)

    async def _call_app(self, scope, body: bytes, receive, send) -> None:
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        state = {"started": False, "status": 200, "headers": [], "error_body": []}

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


def build_app(mlflow_model_dir: str, limits: ServeLimits):
    """MLflow's scoring app for the model, behind ``ServeGuard``."""
    import mlflow
    from mlflow.pyfunc import scoring_server

    # MLflow's own timeout (it answers 504 but lets the work run on) must not fire before ours.
    os.environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(int(limits.request_timeout_s) + 30)
    model = mlflow.pyfunc.load_model(mlflow_model_dir)
    try:
        deadline_var = getattr(model.unwrap_python_model(), "DEADLINE", None)
    except Exception:  # noqa: BLE001  (any model that is not ours: no deadline hook)
        deadline_var = None
    return ServeGuard(scoring_server.init(model), limits, deadline_var)


def serve(model_uri: str, tracker=None, host: str = "127.0.0.1", port: int = 5000,
          limits: ServeLimits | None = None, bf16: str | None = None) -> None:
    """``bf16``: auto, true or false (None: ``$SPARKTUNE_BF16``, else auto); the model is loaded
    in this process, which reads it from the environment (``sparktune.model.hf.resolve_bf16``)."""
    import uvicorn

    limits = limits or ServeLimits()
    limits.check()
    if bf16 is not None:
        os.environ[BF16_ENV] = bf16
    if not 0 < port < 65536:
        raise SparktuneError(f"--port must be 1..65535, got {port}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: the endpoint has no authentication; put it behind one", file=sys.stderr)
    model_dir = prepare_serving_model(model_uri, tracker)
    app = build_app(model_dir, limits)
    print(f"serving {model_uri} on http://{host}:{port} (routes: /ping /health /version /invocations)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("SPARKTUNE_SERVE_LOG_LEVEL", "warning"))


def _serve_cli(args, ctx) -> int:
    limits = ServeLimits(int(args.max_body_mb * 1024 * 1024), args.max_rows, args.request_timeout,
                         args.body_timeout)
    serve(args.model, ctx.tracker(), host=args.host, port=args.port, limits=limits, bf16=args.bf16)
    return 0


def _export_cli(args, ctx) -> ExportResult:
    return export_model(args.model, args.output, ctx.tracker())


def add_cli(subparsers) -> None:
    from sparktune.cli import stage_parser

    defaults = ServeLimits()
    p = stage_parser(subparsers, "serve",
                     help="serve a model over HTTP with MLflow's scoring server (/ping, /health, /invocations)",
                     description="Serve the model: POST text to /invocations, get label and class probabilities "
                                 "(or generated text and loss) back.")
    p.add_argument("--model", required=True,
                   help="models:/<name>@<alias>, runs:/<run_id>/model, models:/m-<id> or a model folder")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / 1024 / 1024,
                   help="largest request body accepted (default 10 MB; 413 above)")
    p.add_argument("--max-rows", type=int, default=defaults.max_rows,
                   help=f"most rows per request (default {defaults.max_rows}; 413 above)")
    p.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s,
                   help=f"seconds a request may compute before it is stopped and answered 504 "
                        f"(default {defaults.request_timeout_s:g})")
    p.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s,
                   help=f"seconds a client has to send the whole body before 408 (default {defaults.body_timeout_s:g})")
    p.add_argument("--bf16", choices=("auto", "true", "false"), default=None,
                   help="run the model in bfloat16: auto (default; on where bf16 is faster than fp32: a GPU "
                        f"with bf16, a CPU with AMX), true or false; also ${BF16_ENV}")
    p.set_defaults(func=_serve_cli)

    e = stage_parser(subparsers, "export-model",
                     help="write the MLflow model folder for Databricks Model Serving / Azure ML",
                     description="Copy the registered model (a self-contained MLflow pyfunc) to a folder.")
    e.add_argument("--model", required=True, help="a model URI or folder, as for serve")
    e.add_argument("--output", required=True, help="new folder to write")
    e.set_defaults(func=_export_cli)
