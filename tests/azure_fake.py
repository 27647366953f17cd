"""A local stand-in for an Azure OpenAI resource: a real HTTP server on 127.0.0.1 (free port), as strict
as Azure's published contract.

Every request is validated against the vendored specs (tests/openapi/, through ``azure_contract``
and ``openapi-core``) before it is served: a wrong or missing ``api-version``, an invalid body or
multipart upload is answered as Azure answers it (404 / 400) and recorded in ``rejected``. Every
response the fake sends is validated too; one the spec does not allow is answered 500 and recorded
in ``violations`` (tests assert it stays empty), so the fake cannot drift from the contract.

data plane (``{endpoint}/openai/...?api-version=2024-10-21``, ``api-key`` header or Entra bearer token)
  POST /openai/files (multipart: purpose, file)          GET /openai/files/{id}[/content]
  POST /openai/fine_tuning/jobs                          GET /openai/fine_tuning/jobs/{id}
  GET  /openai/fine_tuning/jobs/{id}/events (after, limit, has_more)
  GET  /openai/fine_tuning/jobs/{id}/checkpoints
  POST /openai/deployments/{deployment}/chat/completions
management plane (Azure Resource Manager, bearer token, ``api-version=2024-10-01``)
  PUT|GET /subscriptions/{s}/resourceGroups/{g}/providers/Microsoft.CognitiveServices/accounts/{a}/deployments/{name}
  GET     the PUT's ``Azure-AsyncOperation`` URL (ARM's operation status resource)

Behaviour the tests steer: jobs move pending -> running -> succeeded (the 2024-10-21 states) on a
clock (``stage_s``); a job whose suffix contains ``fail`` fails with an error message; one whose
suffix contains ``slow`` runs for ``slow_s``; ``inject(route, status, times, retry_after)`` makes the
next calls of a route answer an error (e.g. 429 with Retry-After); ``omit_file_bytes`` and
``omit_list_data`` leave out fields the spec does not require; ``deploy_outcome`` is the state a
deployment ends in (``Succeeded``, ``Failed``, ``Disabled``) and ``async_operation`` whether the
PUT answers with an ``Azure-AsyncOperation`` URL. Chat answers come from a small sentiment
lexicon; a review with no lexicon word gets an answer that names no label. The server records
every request and the peak of concurrent chats.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from azure_contract import Contract, Plane

__all__ = ["FakeAzureOpenAI"]

_POSITIVE = {"great", "excellent", "wonderful", "loved", "love", "best", "beautiful", "brilliant", "amazing", "perfect",
             "enjoyed", "favorite", "superb", "fun", "good", "masterpiece", "moving", "recommend"}
_NEGATIVE = {"bad", "worst", "awful", "terrible", "boring", "waste", "poor", "horrible", "stupid", "dull", "worse",
             "disappointing", "disappointed", "lame", "mess", "annoying", "predictable", "nothing", "unfortunately"}
_MGMT = re.compile(
    r"^/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/Microsoft\.CognitiveServices/accounts/([^/]+)"
    r"/deployments/([^/]+)$"
)
_OPERATION = re.compile(
    r"^/subscriptions/([^/]+)/providers/Microsoft\.CognitiveServices/locations/([^/]+)/operationResults/([^/]+)$"
)
_CHAT = re.compile(r"^/openai/deployments/([^/]+)/chat/completions$")
# The authoring spec's ErrorCode enum, by HTTP status (its error bodies must use one of these).
_AUTHORING_CODES = {400: "invalidPayload", 401: "unauthorized", 403: "forbidden", 404: "notFound", 409: "conflict",
                    429: "tooManyRequests", 500: "internalFailure", 503: "serviceUnavailable"}


class FakeAzureOpenAI:
    def __init__(
        self,
        api_key: str,
        management_token: str,
        ad_token: str = "",
        stage_s: float = 0.3,
        slow_s: float = 30.0,
        file_processing_s: float = 0.2,
        deploy_s: float = 0.3,
        chat_delay_s: float = 0.02,
        steps: int = 12,
    ):
        self.api_key, self.management_token, self.ad_token = api_key, management_token, ad_token
        self.stage_s, self.slow_s, self.file_processing_s, self.deploy_s = stage_s, slow_s, file_processing_s, deploy_s
        self.chat_delay_s, self.steps = chat_delay_s, steps
        self.omit_file_bytes = False
        self.omit_list_data = False
        self.deploy_outcome = "Succeeded"
        self.async_operation = True
        self.files: dict = {}
        self.jobs: dict = {}
        self.deployments: dict = {}
        self.operations: dict = {}
        self.requests: list = []  # (method, route, status)
        self.rejected: list = []  # (route, [spec errors]): requests the contract refused
        self.violations: list = []  # (route, status, [spec errors]): responses the contract forbids (a fake bug)
        self._injected: dict = {}
        self._lock = threading.Lock()
        self._validate_lock = threading.Lock()
        self._in_flight = 0
        self.max_concurrent_chats = 0
        self._server: ThreadingHTTPServer | None = None

    # -- control ---------------------------------------------------------------------------
    def start(self) -> FakeAzureOpenAI:
        fake = self
        for plane in Plane:
            Contract.for_plane(plane)  # load (and check) the specs before the first request

        class Handler(_Handler):
            server_state = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def client_env(self) -> dict:
        """The environment ``sparktune openai`` reads to reach this fake (both planes)."""
        return {"AZURE_OPENAI_ENDPOINT": self.endpoint, "AZURE_OPENAI_API_KEY": self.api_key,
                "OPENAI_API_VERSION": "2024-10-21", "AZURE_SUBSCRIPTION_ID": "00000000-1111-2222-3333-444444444444",
                "AZURE_RESOURCE_GROUP": "rg-sparktune", "AZURE_OPENAI_RESOURCE": "aoai-sparktune",
                "AZURE_MANAGEMENT_TOKEN": self.management_token, "AZURE_MANAGEMENT_ENDPOINT": self.endpoint}

    def inject(self, route: str, status: int, times: int = 1, retry_after: str | None = None) -> None:
        """The next ``times`` calls of ``route`` (e.g. ``jobs.create``, ``chat``) answer ``status``."""
        with self._lock:
            self._injected.setdefault(route, []).extend([(status, retry_after)] * times)

    def count(self, route: str, status: int | None = None) -> int:
        return sum(1 for _, r, s in self.requests if r == route and (status is None or s == status))

    def _take_injection(self, route: str):
        with self._lock:
            queue = self._injected.get(route)
            return queue.pop(0) if queue else None

    # -- state machines ----------------------------------------------------------------------
    def file_view(self, file_id: str) -> dict:
        f = self.files[file_id]
        view = {k: f[k] for k in ("id", "object", "created_at", "filename", "purpose")}
        if not self.omit_file_bytes:
            view["bytes"] = f["bytes"]
        ready = time.time() - f["t0"] >= self.file_processing_s
        view["status"] = f["final_status"] if ready else "pending"
        if view["status"] == "error":
            view["status_details"] = f["details"]
        return view

    def _job_timeline(self, job: dict) -> list:
        """``(offset_s, status, event_message, event_type, data)`` in order; the clock picks how far it got."""
        s = self.stage_s
        fid, model = job["training_file"], job["model"]
        out = [(0.0, "pending", f"Job enqueued. Validating training file: {fid}", "message", None)]
        if "fail" in job["suffix"]:
            message = ("The job failed due to an invalid training file. Expected file to have JSONL format "
                       "with prompt/completion keys or messages, found 3 examples missing an assistant message.")
            out.append((s, "failed", message, "message", None))
            return out
        out.append((s, "pending", "Files validated. Job queued", "message", None))
        out.append((2 * s, "running", f"Fine-tuning job started on {model}", "message", None))
        run_s = self.slow_s if "slow" in job["suffix"] else 2 * s
        for step in range(1, self.steps + 1):
            data = job["metrics"][step - 1]
            out.append((2 * s + run_s * step / (self.steps + 1), "running",
                        f"Step {step}/{self.steps}: training loss={data['train_loss']:.4f}", "metrics", data))
        out.append((2 * s + run_s, "succeeded", "The job has successfully completed", "message", None))
        return out

    def job_view(self, job_id: str) -> dict:
        job = self.jobs[job_id]
        elapsed = time.time() - job["t0"]
        reached = [e for e in self._job_timeline(job) if e[0] <= elapsed]
        status = reached[-1][1]
        # The 2024-10-21 contract marks no field nullable: a value that does not exist is left out.
        view = {
            "id": job_id, "object": "fine_tuning.job", "model": job["model"], "created_at": int(job["t0"]),
            "status": status, "training_file": job["training_file"], "hyperparameters": job["hyperparameters"],
            "seed": job["seed"],
        }
        if job["validation_file"]:
            view["validation_file"] = job["validation_file"]
        if job["suffix"]:
            view["suffix"] = job["suffix"]
        if status == "succeeded":
            view["finished_at"] = int(job["t0"] + reached[-1][0])
            view["fine_tuned_model"] = job["fine_tuned_model"]
            view["result_files"] = [self._results_file(job_id)]
            view["trained_tokens"] = job["trained_tokens"]
        elif status == "failed":
            view["finished_at"] = int(job["t0"] + reached[-1][0])
            view["error"] = {"code": "invalid_training_file", "message": reached[-1][2], "param": "training_file"}
        return view

    def job_events(self, job_id: str) -> list:
        """Every event so far, newest first, as the service lists them."""
        job = self.jobs[job_id]
        elapsed = time.time() - job["t0"]
        events = []
        for i, (offset, _status, message, kind, data) in enumerate(self._job_timeline(job)):
            if offset <= elapsed:
                event = {"id": f"ftevent-{job_id[6:]}-{i:04d}", "object": "fine_tuning.job.event",
                         "created_at": int(job["t0"] + offset), "level": "error" if "failed" in message else "info",
                         "message": message, "type": kind}
                if data:
                    event["data"] = data
                events.append(event)
        return list(reversed(events))

    def _results_file(self, job_id: str) -> str:
        job = self.jobs[job_id]
        if job.get("results_file"):
            return job["results_file"]
        lines = ["step,train_loss,train_mean_token_accuracy,valid_loss,valid_mean_token_accuracy,full_valid_loss,"
                 "full_valid_mean_token_accuracy"]
        for m in job["metrics"]:
            full = m["step"] == self.steps
            lines.append(
                f"{m['step']},{m['train_loss']:.5f},{m['train_mean_token_accuracy']:.5f},{m['valid_loss']:.5f},"
                f"{m['valid_mean_token_accuracy']:.5f},{format(m['valid_loss'] * 0.98, '.5f') if full else ''},"
                f"{format(m['valid_mean_token_accuracy'], '.5f') if full else ''}"
            )
        # Azure serves the results CSV base64-encoded.
        content = base64.b64encode(("\n".join(lines) + "\n").encode())
        file_id = self._add_file("results.csv", "fine-tune-results", content)
        job["results_file"] = file_id
        return file_id

    def _add_file(self, filename: str, purpose: str, content: bytes, final_status: str = "processed",
                  details: str = "") -> str:
        file_id = "file-" + uuid.uuid4().hex
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                               "filename": filename, "purpose": purpose, "content": content, "t0": time.time(),
                               "final_status": final_status, "details": details}
        return file_id

    def _state(self, key) -> str:
        d = self.deployments[key]
        return d["outcome"] if time.time() - d["t0"] >= self.deploy_s else "Creating"

    def deployment_view(self, key) -> dict:
        view = json.loads(json.dumps(self.deployments[key]["resource"]))
        view["properties"]["provisioningState"] = self._state(key)
        return view

    def operation_view(self, op_id: str) -> dict:
        key = self.operations[op_id]
        state = self._state(key)
        # An operation is InProgress, then Succeeded or Failed (a deployment that ends Disabled did not succeed).
        status = {"Creating": "InProgress", "Succeeded": "Succeeded"}.get(state, "Failed")
        view = {"id": op_id, "name": op_id, "status": status}
        if status == "Failed":
            view["error"] = {"code": "DeploymentFailed",
                             "message": f"The deployment ended {state}: capacity is not available in this region "
                                        "for the requested SKU."}
        return view

    def deployment_ready(self, name: str) -> bool:
        return any(k[3] == name and self._state(k) == "Succeeded" for k in self.deployments)

    def answer(self, text: str) -> str:
        words = re.findall(r"[a-z]+", text.lower())
        score = sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words)
        if score == 0 and not any(w in _POSITIVE or w in _NEGATIVE for w in words):
            return "I cannot tell."
        return "positive" if score > 0 else "negative"


class _Reply(Exception):
    """Raised by a handler to answer at once: ``(status, body, headers)``."""

    def __init__(self, status: int, body: dict, headers: dict | None = None):
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


class _Handler(BaseHTTPRequestHandler):
    server_state: FakeAzureOpenAI
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # -- plumbing ----------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        self.query = {k: v[0] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        self.method, self.url_path = method, url.path.rstrip("/")
        self.plane, self.route = None, "unknown"
        try:
            status, body, headers, raw = self._route()
        except _Reply as reply:
            status, body, headers, raw = reply.status, reply.body, reply.headers, None
        self._send(status, body, headers, raw)

    def _error(self, status: int, message: str, code: str | None = None) -> dict:
        """An error body in the shape this plane's contract declares."""
        if self.plane is Plane.AUTHORING:
            return {"error": {"code": _AUTHORING_CODES.get(status, "internalFailure"), "message": message}}
        return {"error": {"code": code or str(status), "message": message}}

    def _send(self, status: int, body, headers: dict | None = None, raw: bytes | None = None) -> None:
        fake = self.server_state
        data = raw if raw is not None else json.dumps(body).encode()
        content_type = "application/octet-stream" if raw is not None else "application/json"
        if self.plane is not None and self.route != "mgmt.operation":
            with fake._validate_lock:
                errors = Contract.for_plane(self.plane).response_errors(
                    self.method, self.url_path, self.query, dict(self.headers), self.body, status, data, content_type)
            if errors:
                fake.violations.append((self.route, status, errors))
                status, data, content_type = 500, json.dumps(self._error(500, "fake: response breaks the contract")
                                                             ).encode(), "application/json"
        with fake._lock:
            fake.requests.append((self.method, self.route, status))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("apim-request-id", uuid.uuid4().hex)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _check_request(self, contract: Contract, bad_version_status: int, bad_version_code: str) -> None:
        """Azure's answers to a request its contract refuses: unknown api-version, invalid parameters or body."""
        fake = self.server_state
        version = self.query.get("api-version")
        if version is not None and version != contract.api_version:
            fake.rejected.append((self.route, [f"api-version {version!r} is not {contract.api_version!r}"]))
            raise _Reply(bad_version_status, self._error(
                bad_version_status, f"The api-version '{version}' is invalid. The supported versions are "
                                    f"'{contract.api_version}'.", bad_version_code))
        with fake._validate_lock:
            errors = contract.request_errors(self.method, self.url_path, self.query, dict(self.headers), self.body)
        if errors and errors[0].startswith(("PathNotFound", "OperationNotFound")):
            self.plane = None  # a route the contract does not have: Azure's plain 404
            raise _Reply(404, {"error": {"code": "404", "message": "Resource not found"}})
        if errors:
            fake.rejected.append((self.route, errors))
            status = 404 if version is None and self.plane is not Plane.MANAGEMENT else 400
            code = "MissingApiVersionParameter" if version is None else "InvalidRequestContent"
            raise _Reply(status, self._error(status, "Request validation failed: " + errors[0].splitlines()[-1].strip(),
                                             code))

    def _injected(self, route: str) -> None:
        taken = self.server_state._take_injection(route)
        if taken:
            status, retry_after = taken
            message = {429: "Rate limit is exceeded. Try again in 1 seconds.", 404: "The file is not available."}.get(
                status, "The server had an error while processing your request.")
            raise _Reply(status, self._error(status, message, "TooManyRequests" if status == 429 else None),
                         {"Retry-After": retry_after} if retry_after else None)

    def _route(self):
        path = self.url_path
        m = _MGMT.match(path)
        if m:
            self.plane = Plane.MANAGEMENT
            return self._management(m.groups())
        m = _OPERATION.match(path)
        if m:
            self.plane = Plane.MANAGEMENT
            return self._operation(m.group(3))
        if path.startswith("/openai/"):
            chat = _CHAT.match(path)
            self.plane = Plane.INFERENCE if chat else Plane.AUTHORING
            self._data_plane_auth()
            self._check_request(Contract.for_plane(self.plane), 404, "404")
            if chat:
                return self._chat(chat.group(1))
            return self._authoring(path[len("/openai"):].strip("/").split("/"))
        raise _Reply(404, {"error": {"code": "404", "message": "Resource not found"}})

    # -- management plane -----------------------------------------------------------------
    def _management_auth(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {self.server_state.management_token}":
            raise _Reply(401, self._error(401, "Authentication failed. The 'Authorization' header is missing or "
                                               "invalid.", "AuthenticationFailed"))

    def _management(self, key):
        fake = self.server_state
        self.route = f"mgmt.{self.method.lower()}"
        self._management_auth()
        self._check_request(Contract.for_plane(Plane.MANAGEMENT), 400, "InvalidApiVersionParameter")
        self._injected(self.route)
        if self.method == "GET":
            if key not in fake.deployments:
                raise _Reply(404, self._error(404, f"Deployment {key[3]} not found.", "DeploymentNotFound"))
            return 200, fake.deployment_view(key), None, None
        spec = json.loads(self.body)
        sku, model = spec["sku"], spec["properties"]["model"]
        known = {j["fine_tuned_model"] for j_id, j in fake.jobs.items() if fake.job_view(j_id)["status"] == "succeeded"}
        if model.get("name") not in known:
            raise _Reply(400, self._error(400, f"The model '{model.get('name')}' is not supported or not found in "
                                               "this resource.", "DeploymentModelNotSupported"))
        sub, rg, acct, name = key
        resource = {
            "id": f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.CognitiveServices/accounts/{acct}"
                  f"/deployments/{name}",
            "type": "Microsoft.CognitiveServices/accounts/deployments",
            "name": name,
            "sku": {"name": sku["name"], "capacity": int(sku.get("capacity", 1))},
            "properties": {"model": {"format": model.get("format", "OpenAI"), "name": model["name"],
                                     "version": str(model.get("version", "1"))}},
            "systemData": {"createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        }
        existed = key in fake.deployments
        fake.deployments[key] = {"resource": resource, "t0": time.time(), "outcome": fake.deploy_outcome}
        headers = None
        if fake.async_operation:
            op_id = uuid.uuid4().hex
            fake.operations[op_id] = key
            headers = {"Azure-AsyncOperation": f"{fake.endpoint}/subscriptions/{sub}/providers/"
                                               f"Microsoft.CognitiveServices/locations/eastus/operationResults/{op_id}"
                                               "?api-version=2024-10-01"}
        return (200 if existed else 201), fake.deployment_view(key), headers, None

    def _operation(self, op_id: str):
        """ARM's async operation status (common-types' OperationStatusResult); no spec path declares it,
        so its body is checked against that schema here."""
        fake = self.server_state
        self.route = "mgmt.operation"
        self._management_auth()
        if self.query.get("api-version") != Contract.for_plane(Plane.MANAGEMENT).api_version:
            raise _Reply(400, self._error(400, "api-version is required", "MissingApiVersionParameter"))
        if op_id not in fake.operations:
            raise _Reply(404, self._error(404, "Operation not found.", "NotFound"))
        view = fake.operation_view(op_id)
        errors = Contract.for_plane(Plane.MANAGEMENT).schema_errors("OperationStatusResult", view)
        if errors:
            fake.violations.append((self.route, 200, errors))
        return 200, view, None, None

    # -- data plane -------------------------------------------------------------------------
    def _data_plane_auth(self) -> None:
        fake = self.server_state
        if self.headers.get("api-key") == fake.api_key or (
                fake.ad_token and self.headers.get("Authorization") == f"Bearer {fake.ad_token}"):
            return
        self.route = "auth"
        raise _Reply(401, self._error(401, "Access denied due to invalid subscription key or wrong API endpoint. Make "
                                           "sure to provide a valid key for an active subscription and use a correct "
                                           "regional API endpoint for your resource."))

    def _authoring(self, parts: list):
        fake = self.server_state
        if parts == ["files"] and self.method == "POST":
            self.route = "files.create"
            return self._upload()
        if parts[0] == "files" and len(parts) in (2, 3) and self.method == "GET":
            self.route = "files.content" if len(parts) == 3 else "files.retrieve"
            self._injected(self.route)
            if parts[1] not in fake.files:
                raise _Reply(404, self._error(404, f"File with id '{parts[1]}' not found."))
            if len(parts) == 3:
                return 200, None, None, fake.files[parts[1]]["content"]
            return 200, fake.file_view(parts[1]), None, None
        if parts[:2] == ["fine_tuning", "jobs"]:
            return self._jobs(parts[2:])
        raise _Reply(404, self._error(404, "Resource not found"))

    def _upload(self):
        fake = self.server_state
        message = BytesParser(policy=email_policy).parsebytes(
            f"Content-Type: {self.headers.get('Content-Type')}\r\n\r\n".encode() + self.body)
        fields, content, filename = {}, b"", "upload"
        for part in message.iter_parts():
            if part.get_filename() is not None:
                content, filename = part.get_payload(decode=True), part.get_filename()
            else:
                fields[part.get_param("name", header="content-disposition")] = part.get_content().strip()
        final, details = "processed", ""
        for i, line in enumerate(content.splitlines(), 1):
            try:
                assert isinstance(json.loads(line)["messages"], list)
            except (ValueError, KeyError, TypeError, AssertionError):
                final, details = "error", f"Invalid file format. Line {i}: expected a JSON object with a messages list."
                break
        file_id = fake._add_file(filename, fields["purpose"], content, final, details)
        return 201, fake.file_view(file_id), None, None

    def _jobs(self, rest: list):
        fake = self.server_state
        if not rest and self.method == "POST":
            self.route = "jobs.create"
            self._injected(self.route)
            return self._create_job(json.loads(self.body))
        self.route = "jobs.retrieve" if len(rest) == 1 else f"jobs.{rest[1] if len(rest) > 1 else ''}"
        if not rest or rest[0] not in fake.jobs:
            raise _Reply(404, self._error(404, "The specified fine-tuning job was not found."))
        job_id = rest[0]
        self._injected(self.route)
        if len(rest) == 1:
            return 200, fake.job_view(job_id), None, None
        if rest[1:] == ["events"]:
            events = fake.job_events(job_id)
            after = self.query.get("after")
            if after:
                ids = [e["id"] for e in events]
                events = events[ids.index(after) + 1:] if after in ids else []
            limit = int(self.query.get("limit", "20"))
            page = {"object": "list", "has_more": len(events) > limit}
            if not fake.omit_list_data:
                page["data"] = events[:limit]
            return 200, page, None, None
        if rest[1:] == ["checkpoints"]:
            view = fake.job_view(job_id)
            data = []
            if view["status"] == "succeeded":
                for m in fake.jobs[job_id]["metrics"][-3:]:
                    data.append({
                        "id": f"ftckpt-{uuid.uuid4().hex[:24]}", "object": "fine_tuning.job.checkpoint",
                        "created_at": view["finished_at"], "fine_tuning_job_id": job_id, "step_number": m["step"],
                        "fine_tuned_model_checkpoint": f"{view['fine_tuned_model']}:ckpt-step-{m['step']}",
                        "metrics": {"step": m["step"], "train_loss": m["train_loss"], "valid_loss": m["valid_loss"]},
                    })
            page = {"object": "list", "has_more": False}
            if not fake.omit_list_data:
                page["data"] = list(reversed(data))
            return 200, page, None, None
        raise _Reply(404, self._error(404, "Resource not found"))

    def _create_job(self, spec: dict):
        fake = self.server_state
        for key in ("training_file", "validation_file"):
            fid = spec.get(key)
            if fid and (fid not in fake.files or fake.file_view(fid)["status"] != "processed"):
                raise _Reply(400, self._error(400, f"The file '{fid}' is not processed or does not exist."))
        hp = dict(spec.get("hyperparameters") or {})
        hp = {"n_epochs": hp.get("n_epochs", 3), "batch_size": hp.get("batch_size", 1),
              "learning_rate_multiplier": hp.get("learning_rate_multiplier", 1.0)}
        job_hex = uuid.uuid4().hex
        job_id = "ftjob-" + job_hex
        suffix = spec.get("suffix") or ""
        metrics = [
            {"step": k, "train_loss": 1.5 / k, "train_mean_token_accuracy": min(1.0, 0.5 + k / (2 * fake.steps)),
             "valid_loss": 1.6 / k, "valid_mean_token_accuracy": min(1.0, 0.45 + k / (2 * fake.steps))}
            for k in range(1, fake.steps + 1)
        ]
        fake.jobs[job_id] = {
            "t0": time.time(), "model": spec["model"], "training_file": spec["training_file"],
            "validation_file": spec.get("validation_file"), "hyperparameters": hp, "seed": spec.get("seed") or 1234,
            "suffix": suffix, "metrics": metrics,
            "trained_tokens": fake.files[spec["training_file"]]["bytes"] // 4 * hp["n_epochs"],
            "fine_tuned_model": f"{spec['model']}.ft-{job_hex}" + (f"-{suffix}" if suffix else ""),
        }
        return 201, fake.job_view(job_id), None, None

    def _chat(self, deployment: str):
        fake = self.server_state
        self.route = "chat"
        if not fake.deployment_ready(deployment):
            raise _Reply(404, self._error(404, "The API deployment for this resource does not exist. If you created "
                                               "the deployment within the last 5 minutes, please wait a moment and try "
                                               "again.", "DeploymentNotFound"))
        taken = fake._take_injection("chat")
        if taken:
            status, retry_after = taken
            message = ("Requests to the ChatCompletions_Create Operation have exceeded token rate limit of your "
                       "current pricing tier. Please retry after 1 second." if status == 429
                       else "The server had an error while processing your request.")
            raise _Reply(status, self._error(status, message), {"Retry-After": retry_after} if retry_after else None)
        request = json.loads(self.body)
        with fake._lock:
            fake._in_flight += 1
            fake.max_concurrent_chats = max(fake.max_concurrent_chats, fake._in_flight)
        try:
            time.sleep(fake.chat_delay_s)
            user = " ".join(m["content"] for m in request["messages"] if m["role"] == "user")
            answer = fake.answer(user)
        finally:
            with fake._lock:
                fake._in_flight -= 1
        return 200, {
            "id": "chatcmpl-" + uuid.uuid4().hex[:24],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": deployment,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": answer, "refusal": None}}],
            "usage": {"prompt_tokens": len(user) // 4 + 30, "completion_tokens": 1,
                      "total_tokens": len(user) // 4 + 31},
        }, None, None
