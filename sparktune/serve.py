"""``sparktune serve`` and ``sparktune export-model``: the model behind MLflow's scoring server.

The HTTP app is MLflow's own (``mlflow.pyfunc.scoring_server.init``: ``/ping``, ``/health``,
``/version``, ``/invocations`` with ``dataframe_split``, ``dataframe_records``, ``instances``,
``inputs``), the same one ``mlflow models serve`` and Databricks Model Serving run. sparktune
adds one thing in front of it, a request-body size limit (MLflow has none, so one huge POST
would be read into memory whole), and serves the model as sparktune's pyfunc so answers
carry every class probability. A transformers-flavor classifier is converted on the way.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from sparktune.errors import SparktuneError

__all__ = ["prepare_serving_model", "export_model", "build_app", "serve", "BodyLimit", "add_cli"]

DEFAULT_MAX_BODY_MB = 10.0
# Past this many bytes an oversized body is no longer read (to answer 413 on a clean
# connection); the connection is closed instead.
_DRAIN_LIMIT = 64 * 1024 * 1024


def _merged_hf_dir(resolved, dst: str) -> str:
    """One folder with weights and tokenizer (the transformers flavor keeps them apart)."""
    os.makedirs(dst, exist_ok=True)
    for src in (resolved.model_dir, resolved.tokenizer_dir):
        for entry in os.listdir(src):
            path = os.path.join(src, entry)
            target = os.path.join(dst, entry)
            if os.path.isfile(path) and not os.path.exists(target):
                # A hard link costs nothing; MLflow refuses symlinks that leave the artifact folder.
                try:
                    os.link(path, target)
                except OSError:
                    shutil.copy2(path, target)
    return dst


def prepare_serving_model(model_uri, work_dir: str | None = None) -> str:
    """A local MLflow model folder that answers with label + all class probabilities."""
    from sparktune.inference import CLASSIFICATION, ResolvedModel, resolve_model
    from sparktune.pyfunc_model import save_pyfunc_model

    resolved = model_uri if isinstance(model_uri, ResolvedModel) else resolve_model(model_uri)
    if resolved.flavor == "sparktune-pyfunc" and resolved.mlflow_dir:
        return resolved.mlflow_dir
    if resolved.task != CLASSIFICATION:
        if resolved.mlflow_dir:
            return resolved.mlflow_dir  # a causal LM's transformers flavor serves generated text as is
        raise SparktuneError(
            f"model {resolved.uri!r} is a causal LM folder without an MLflow model; serve the "
            "models:/ URI that `sparktune train` logged instead"
        )
    work_dir = work_dir or tempfile.mkdtemp(prefix="sparktune-serve-")
    hf_dir = _merged_hf_dir(resolved, os.path.join(work_dir, "hf_model"))
    out = os.path.join(work_dir, "mlflow_model")
    save_pyfunc_model(hf_dir, out)
    return out


def export_model(model_uri: str, output: str) -> str:
    """Write the MLflow model folder that Databricks Model Serving / Azure ML deploy.

    It has the MLmodel file with the signature and an input example, requirements.txt,
    conda.yaml and python_env.yaml with pinned versions, and the weights.
    """
    if os.path.exists(output) and os.listdir(output):
        raise SparktuneError(f"--output {output} exists and is not empty; give a new folder")
    with tempfile.TemporaryDirectory(prefix="sparktune-export-") as work:
        path = prepare_serving_model(model_uri, work)
        if os.path.exists(output):
            os.rmdir(output)
        shutil.copytree(path, output)
    return output


def _text_type_problem(payload) -> str | None:
    """Where a scoring payload carries review text that is not a string (MLflow would turn a
    number into the string "5" and score it; a client sending numbers has a bug worth a 400)."""

    def bad(value, where):
        if not isinstance(value, str):
            return f"{where}: expected the review text as a string, found {type(value).__name__} {json.dumps(value)[:60]}"
        return None

    if not isinstance(payload, dict):
        return None  # MLflow's own check answers these with a clear 400
    if isinstance(payload.get("dataframe_split"), dict):
        split = payload["dataframe_split"]
        columns, data = split.get("columns"), split.get("data")
        if not isinstance(data, list):
            return "dataframe_split.data: expected a list of rows, e.g. [[\"A great film\"]]"
        col = columns.index("text") if isinstance(columns, list) and "text" in columns else (0 if not columns or len(columns) == 1 else None)
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
                return f"dataframe_records[{i}]: expected an object like {{\"text\": \"A great film\"}}, found {type(record).__name__}"
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


class BodyLimit:
    """ASGI middleware in front of MLflow's app: a request-body size limit and, for text
    models, a type check of the review text. Bodies are read here (bounded) and replayed."""

    def __init__(self, app, max_bytes: int, check_text: bool = False):
        self.app = app
        self.max_bytes = int(max_bytes)
        self.check_text = check_text

    async def _reject(self, send, status: int, message: str, code: str) -> None:
        body = json.dumps({"error_code": code, "message": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _too_large(self, size_text: str) -> str:
        return (f"request body is {size_text}, over this server's limit of {self.max_bytes} bytes; "
                "send fewer rows per request (or restart the server with a larger --max-body-mb)")

    async def _drain(self, receive) -> bool:
        # Read and drop the rest so the client, still sending, gets the 413 rather than a reset
        # connection; past _DRAIN_LIMIT stop reading and let the connection close.
        seen = 0
        while seen <= _DRAIN_LIMIT:
            message = await receive()
            if message["type"] != "http.request":
                return False
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
        return True

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await self._reject(send, 400, f"Content-Length {declared[:40]!r} is not a number", "BAD_REQUEST")
            if size > self.max_bytes:
                if await self._drain(receive):
                    await self._reject(send, 413, self._too_large(f"{size} bytes"), "REQUEST_LIMIT_EXCEEDED")
                return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                if not message.get("more_body", False) or await self._drain(receive):
                    await self._reject(send, 413, self._too_large(f"over {self.max_bytes} bytes (chunked)"), "REQUEST_LIMIT_EXCEEDED")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if self.check_text and scope.get("path") == "/invocations" and content_type == b"application/json":
            try:
                problem = _text_type_problem(json.loads(body))
            except (ValueError, UnicodeDecodeError):
                problem = None  # not JSON: MLflow's parser answers with its 400
            if problem:
                return await self._reject(send, 400, problem, "BAD_REQUEST")

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def build_app(mlflow_model_dir: str, max_body_bytes: int):
    """MLflow's scoring app for the model, behind the body-size limit."""
    import mlflow
    from mlflow.pyfunc import scoring_server

    from sparktune.pyfunc_model import MODEL_KIND

    model = mlflow.pyfunc.load_model(mlflow_model_dir)
    is_text_classifier = (model.metadata.metadata or {}).get("sparktune_kind") == MODEL_KIND
    return BodyLimit(scoring_server.init(model), max_body_bytes, check_text=is_text_classifier)


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 5000, max_body_mb: float = DEFAULT_MAX_BODY_MB) -> None:
    import uvicorn

    if max_body_mb <= 0:
        raise SparktuneError(f"--max-body-mb must be > 0, got {max_body_mb}")
    if not 0 < port < 65536:
        raise SparktuneError(f"--port must be 1..65535, got {port}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: the endpoint has no authentication; put it behind one", file=sys.stderr)
    model_dir = prepare_serving_model(model_uri)
    app = build_app(model_dir, int(max_body_mb * 1024 * 1024))
    print(f"serving {model_uri} on http://{host}:{port} (routes: /ping /health /version /invocations)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("SPARKTUNE_SERVE_LOG_LEVEL", "warning"))


def _serve_cli(args) -> int:
    from sparktune.registry import use_tracking_uri

    use_tracking_uri(args.tracking_uri)
    serve(args.model, host=args.host, port=args.port, max_body_mb=args.max_body_mb)
    return 0


def _export_cli(args) -> int:
    from sparktune.registry import use_tracking_uri

    use_tracking_uri(args.tracking_uri)
    out = export_model(args.model, args.output)
    print(f"MLflow model written to {out} (MLmodel with signature, requirements.txt, conda.yaml, weights)")
    print(f"try it: mlflow models serve -m {out} --env-manager local --port 5001")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP with MLflow's scoring server (/ping, /health, /invocations)",
        description="Serve the model: POST review text to /invocations, get label and class probabilities back.",
    )
    p.add_argument("--model", required=True, help="models:/<name>@<alias>, runs:/<run_id>/model, models:/m-<id> or a model folder")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, help="largest request body accepted (default 10 MB)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: as `sparktune train`)")
    p.set_defaults(func=_serve_cli)

    e = subparsers.add_parser(
        "export-model",
        help="write the MLflow model folder for Databricks Model Serving / Azure ML",
        description="Write a self-contained MLflow pyfunc model (signature, pinned requirements, weights).",
    )
    e.add_argument("--model", required=True, help="a model URI or folder, as for serve")
    e.add_argument("--output", required=True, help="new folder to write")
    e.add_argument("--tracking-uri", help="MLflow tracking URI (default: as `sparktune train`)")
    e.set_defaults(func=_export_cli)
