"""A local stand-in for an Azure OpenAI resource: a real HTTP server on 127.0.0.1 (free port).

It answers the documented routes that ``sparktune.openai`` calls through the official SDK, with
the documented response shapes:

data plane (``{endpoint}/openai/...?api-version=...``, ``api-key`` header or Entra bearer token)
  POST /openai/files (multipart: purpose, file)          GET /openai/files/{id}[/content]
  POST /openai/fine_tuning/jobs                          GET /openai/fine_tuning/jobs/{id}
  GET  /openai/fine_tuning/jobs/{id}/events              GET /openai/fine_tuning/jobs/{id}/checkpoints
  POST /openai/deployments/{deployment}/chat/completions
management plane (Azure Resource Manager, bearer token)
  PUT|GET /subscriptions/{s}/resourceGroups/{g}/providers/Microsoft.CognitiveServices/accounts/{a}/deployments/{name}

Behaviour the tests steer: jobs move validating_files -> queued -> running -> succeeded on a
clock (``stage_s``); a job whose suffix contains ``fail`` fails validation with an error
message; one whose suffix contains ``slow`` runs for ``slow_s``; ``inject(route, status, times,
retry_after)`` makes the next calls of a route answer an error (e.g. 429 with Retry-After).
Chat answers come from a small sentiment lexicon; a review with no lexicon word gets an
answer that names no label. The server records every request and the peak of concurrent chats.
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

__all__ = ["FakeAzureOpenAI"]

_POSITIVE = {"great", "excellent", "wonderful", "loved", "love", "best", "beautiful", "brilliant", "amazing", "perfect",
             "enjoyed", "favorite", "superb", "fun", "good", "masterpiece", "moving", "recommend"}
_NEGATIVE = {"bad", "worst", "awful", "terrible", "boring", "waste", "poor", "horrible", "stupid", "dull", "worse",
             "disappointing", "disappointed", "lame", "mess", "annoying", "predictable", "nothing", "unfortunately"}
_MGMT = re.compile(
    r"^/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/Microsoft\.CognitiveServices/accounts/([^/]+)/deployments/([^/]+)$"
)


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
        self.files: dict = {}
        self.jobs: dict = {}
        self.deployments: dict = {}
        self.requests: list = []  # (method, route, status)
        self._injected: dict = {}
        self._lock = threading.Lock()
        self._in_flight = 0
        self.max_concurrent_chats = 0
        self._server: ThreadingHTTPServer | None = None

    # -- control ---------------------------------------------------------------------------
    def start(self) -> FakeAzureOpenAI:
        fake = self

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
        view = {k: f[k] for k in ("id", "object", "bytes", "created_at", "filename", "purpose")}
        ready = time.time() - f["t0"] >= self.file_processing_s
        view["status"] = (f["final_status"] if ready else "pending")
        if view["status"] == "error":
            view["status_details"] = f["details"]
        return view

    def _job_timeline(self, job: dict) -> list:
        """``(offset_s, status, event_message, event_type, data)`` in order; the clock picks how far it got."""
        s = self.stage_s
        fid, model = job["training_file"], job["model"]
        out = [(0.0, "validating_files", f"Validating training file: {fid}", "message", None)]
        if "fail" in job["suffix"]:
            message = ("The job failed due to an invalid training file. Expected file to have JSONL format "
                       "with prompt/completion keys or messages, found 3 examples missing an assistant message.")
            out.append((s, "failed", message, "message", None))
            return out
        out.append((s, "queued", "Files validated. Job queued", "message", None))
        out.append((2 * s, "running", f"Fine-tuning job started on {model}", "message", None))
        run_s = self.slow_s if "slow" in job["suffix"] else 2 * s
        for step in range(1, self.steps + 1):
            data = job["metrics"][step - 1]
            out.append(
                (
                    2 * s + run_s * step / (self.steps + 1),
                    "running",
                    f"Step {step}/{self.steps}: training loss={data['train_loss']:.4f}",
                    "metrics",
                    data,
                )
            )
        out.append((2 * s + run_s, "succeeded", "The job has successfully completed", "message", None))
        return out

    def job_view(self, job_id: str) -> dict:
        job = self.jobs[job_id]
        elapsed = time.time() - job["t0"]
        reached = [e for e in self._job_timeline(job) if e[0] <= elapsed]
        status = reached[-1][1]
        view = {
            "id": job_id, "object": "fine_tuning.job", "model": job["model"], "created_at": int(job["t0"]),
            "finished_at": None, "fine_tuned_model": None, "organization_id": "org-fake", "result_files": [],
            "status": status, "training_file": job["training_file"], "validation_file": job["validation_file"],
            "hyperparameters": job["hyperparameters"], "seed": job["seed"], "trained_tokens": None, "error": None,
            "suffix": job["suffix"] or None, "estimated_finish": None, "integrations": [],
        }
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
        job = self.jobs[job_id]
        elapsed = time.time() - job["t0"]
        events = []
        for i, (offset, _status, message, kind, data) in enumerate(self._job_timeline(job)):
            if offset <= elapsed:
                events.append(
                    {
                        "id": f"ftevent-{job_id[6:]}-{i:04d}",
                        "object": "fine_tuning.job.event",
                        "created_at": int(job["t0"] + offset),
                        "level": "error" if "failed" in message else "info",
                        "message": message,
                        "type": kind,
                        "data": data or {},
                    }
                )
        return list(reversed(events))  # newest first, as the service lists them

    def _results_file(self, job_id: str) -> str:
        job = self.jobs[job_id]
        if job.get("results_file"):
            return job["results_file"]
        lines = [
            "step,train_loss,train_mean_token_accuracy,valid_loss,valid_mean_token_accuracy,full_valid_loss,full_valid_mean_token_accuracy"
        ]
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

    def _add_file(
        self, filename: str, purpose: str, content: bytes, final_status: str = "processed", details: str = ""
    ) -> str:
        file_id = "file-" + uuid.uuid4().hex
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                               "filename": filename, "purpose": purpose, "content": content, "t0": time.time(),
                               "final_status": final_status, "details": details}
        return file_id

    def deployment_view(self, key) -> dict:
        d = self.deployments[key]
        view = json.loads(json.dumps(d["resource"]))
        view["properties"]["provisioningState"] = "Succeeded" if time.time() - d["t0"] >= self.deploy_s else "Creating"
        return view

    def deployment_ready(self, name: str) -> bool:
        return any(
            k[3] == name and self.deployment_view(k)["properties"]["provisioningState"] == "Succeeded"
            for k in self.deployments
        )

    def answer(self, text: str) -> str:
        words = re.findall(r"[a-z]+", text.lower())
        score = sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words)
        if score == 0 and not any(w in _POSITIVE or w in _NEGATIVE for w in words):
            return "I cannot tell."
        return "positive" if score > 0 else "negative"


def _err(code, message) -> dict:
    return {"error": {"code": str(code), "message": message}}


class _Handler(BaseHTTPRequestHandler):
    server_state: FakeAzureOpenAI
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body, route: str, headers: dict | None = None, raw: bytes | None = None) -> None:
        fake = self.server_state
        with fake._lock:
            fake.requests.append((self.command, route, status))
        data = raw if raw is not None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("apim-request-id", uuid.uuid4().hex)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        body = self._body()
        path = url.path.rstrip("/")
        m = _MGMT.match(path)
        if m:
            return self._management(method, m.groups(), query, body)
        if path.startswith("/openai/"):
            return self._data_plane(method, path[len("/openai"):], query, body)
        self._send(404, _err("404", "Resource not found"), "unknown")

    # -- management plane -----------------------------------------------------------------
    def _management(self, method, key, query, body) -> None:
        fake = self.server_state
        route = f"mgmt.{method.lower()}"
        if self.headers.get("Authorization") != f"Bearer {fake.management_token}":
            return self._send(
                401,
                {
                    "error": {
                        "code": "AuthenticationFailed",
                        "message": "Authentication failed. The 'Authorization' header is missing or invalid.",
                    }
                },
                route,
            )
        if "api-version" not in query:
            return self._send(
                400,
                {
                    "error": {
                        "code": "MissingApiVersionParameter",
                        "message": "The api-version query parameter (?api-version=) is required for all requests.",
                    }
                },
                route,
            )
        injected = fake._take_injection(route)
        if injected:
            status, retry_after = injected
            return self._send(
                status,
                {
                    "error": {
                        "code": "TooManyRequests" if status == 429 else "InternalServerError",
                        "message": "injected",
                    }
                },
                route,
                {"Retry-After": retry_after} if retry_after else None,
            )
        if method == "GET":
            if key not in fake.deployments:
                return self._send(
                    404, {"error": {"code": "DeploymentNotFound", "message": f"Deployment {key[3]} not found."}}, route
                )
            return self._send(200, fake.deployment_view(key), route)
        if method != "PUT":
            return self._send(405, _err("405", "method not allowed"), route)
        try:
            spec = json.loads(body)
            sku, model = spec["sku"], spec["properties"]["model"]
            assert model["format"] == "OpenAI" and model["name"] and int(sku["capacity"]) >= 1 and sku["name"]
        except (ValueError, KeyError, TypeError, AssertionError):
            return self._send(
                400,
                {
                    "error": {
                        "code": "InvalidRequestContent",
                        "message": "The request content was invalid: expected sku {name, capacity} and "
                                   "properties.model {format, name, version}.",
                    }
                },
                route,
            )
        known = {j["fine_tuned_model"] for j_id, j in fake.jobs.items() if fake.job_view(j_id)["status"] == "succeeded"}
        if model["name"] not in known:
            return self._send(
                400,
                {
                    "error": {
                        "code": "DeploymentModelNotSupported",
                        "message": f"The model '{model['name']}' is not supported or not found in this resource.",
                    }
                },
                route,
            )
        sub, rg, acct, name = key
        resource = {
            "id": f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.CognitiveServices/accounts/{acct}"
                  f"/deployments/{name}",
            "type": "Microsoft.CognitiveServices/accounts/deployments",
            "name": name,
            "sku": {"name": sku["name"], "capacity": int(sku["capacity"])},
            "properties": {
                "model": {"format": "OpenAI", "name": model["name"], "version": str(model.get("version", "1"))},
                "provisioningState": "Creating",
                "rateLimits": [{"key": "request", "renewalPeriod": 10, "count": int(sku["capacity"])}],
            },
            "systemData": {"createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        }
        existed = key in fake.deployments
        fake.deployments[key] = {"resource": resource, "t0": time.time()}
        self._send(200 if existed else 201, fake.deployment_view(key), route)

    # -- data plane -------------------------------------------------------------------------
    def _data_plane(self, method, path, query, body) -> None:
        fake = self.server_state
        auth_ok = self.headers.get("api-key") == fake.api_key or (
            fake.ad_token and self.headers.get("Authorization") == f"Bearer {fake.ad_token}")
        if not auth_ok:
            return self._send(
                401,
                _err(
                    "401",
                    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide "
                    "a valid key for an active subscription and use a correct regional API endpoint for your resource.",
                ),
                "auth",
            )
        if "api-version" not in query:
            return self._send(404, _err("404", "Resource not found"), "no-api-version")
        parts = path.strip("/").split("/")
        if parts == ["files"] and method == "POST":
            return self._upload(body)
        if parts[0] == "files" and len(parts) in (2, 3) and method == "GET":
            if parts[1] not in fake.files:
                return self._send(404, _err("404", f"File with id '{parts[1]}' not found."), "files.retrieve")
            if len(parts) == 3 and parts[2] == "content":
                return self._send(200, None, "files.content", raw=fake.files[parts[1]]["content"])
            return self._send(200, fake.file_view(parts[1]), "files.retrieve")
        if parts[:2] == ["fine_tuning", "jobs"]:
            return self._jobs(method, parts[2:], query, body)
        if len(parts) == 4 and parts[0] == "deployments" and parts[2:] == ["chat", "completions"] and method == "POST":
            return self._chat(parts[1], body)
        self._send(404, _err("404", "Resource not found"), "unknown")

    def _upload(self, body: bytes) -> None:
        fake = self.server_state
        message = BytesParser(policy=email_policy).parsebytes(
            f"Content-Type: {self.headers.get('Content-Type')}\r\n\r\n".encode() + body)
        fields, content, filename = {}, None, None
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if part.get_filename() is not None:
                content, filename = part.get_payload(decode=True), part.get_filename()
            else:
                fields[name] = part.get_content().strip()
        if content is None or fields.get("purpose") != "fine-tune":
            return self._send(
                400,
                _err("invalidPayload", "Expected a multipart form with purpose=fine-tune and a file."),
                "files.create",
            )
        final, details = "processed", ""
        for i, line in enumerate(content.splitlines(), 1):
            try:
                assert isinstance(json.loads(line)["messages"], list)
            except (ValueError, KeyError, TypeError, AssertionError):
                final, details = "error", f"Invalid file format. Line {i}: expected a JSON object with a messages list."
                break
        file_id = fake._add_file(filename, "fine-tune", content, final, details)
        self._send(201, fake.file_view(file_id), "files.create")

    def _jobs(self, method, rest, query, body) -> None:
        fake = self.server_state
        if not rest and method == "POST":
            injected = fake._take_injection("jobs.create")
            if injected:
                status, retry_after = injected
                return self._send(
                    status,
                    _err(str(status), "Rate limit is exceeded. Try again in 1 seconds."),
                    "jobs.create",
                    {"Retry-After": retry_after} if retry_after else None,
                )
            spec = json.loads(body or b"{}")
            for key in ("training_file", "validation_file"):
                fid = spec.get(key)
                if key == "training_file" and not fid:
                    return self._send(400, _err("invalidPayload", "training_file is required."), "jobs.create")
                if fid and (fid not in fake.files or fake.file_view(fid)["status"] != "processed"):
                    return self._send(
                        400,
                        _err("invalidPayload", f"The file '{fid}' is not processed or does not exist."),
                        "jobs.create",
                    )
            hp = dict(spec.get("hyperparameters") or {})
            hp = {"n_epochs": hp.get("n_epochs", 3), "batch_size": hp.get("batch_size", 1),
                  "learning_rate_multiplier": hp.get("learning_rate_multiplier", 1.0)}
            job_hex = uuid.uuid4().hex
            job_id = "ftjob-" + job_hex
            suffix = spec.get("suffix") or ""
            metrics = [
                {
                    "step": k,
                    "train_loss": 1.5 / k,
                    "train_mean_token_accuracy": min(1.0, 0.5 + k / (2 * fake.steps)),
                    "valid_loss": 1.6 / k,
                    "valid_mean_token_accuracy": min(1.0, 0.45 + k / (2 * fake.steps)),
                }
                for k in range(1, fake.steps + 1)
            ]
            fake.jobs[job_id] = {
                "t0": time.time(),
                "model": spec["model"],
                "training_file": spec["training_file"],
                "validation_file": spec.get("validation_file"),
                "hyperparameters": hp,
                "seed": spec.get("seed") or 1234,
                "suffix": suffix,
                "metrics": metrics,
                "trained_tokens": fake.files[spec["training_file"]]["bytes"] // 4 * hp["n_epochs"],
                "fine_tuned_model": f"{spec['model']}.ft-{job_hex}" + (f"-{suffix}" if suffix else ""),
            }
            return self._send(201, fake.job_view(job_id), "jobs.create")
        if not rest or rest[0] not in fake.jobs:
            return self._send(404, _err("404", "The specified fine-tuning job was not found."), "jobs.retrieve")
        job_id = rest[0]
        if len(rest) == 1 and method == "GET":
            return self._send(200, fake.job_view(job_id), "jobs.retrieve")
        if rest[1:] == ["events"] and method == "GET":
            events = fake.job_events(job_id)
            limit = int(query.get("limit", ["20"])[0])
            return self._send(
                200, {"object": "list", "data": events[:limit], "has_more": len(events) > limit}, "jobs.events"
            )
        if rest[1:] == ["checkpoints"] and method == "GET":
            view = fake.job_view(job_id)
            data = []
            if view["status"] == "succeeded":
                for m in fake.jobs[job_id]["metrics"][-3:]:
                    data.append(
                        {
                            "id": f"ftckpt-{uuid.uuid4().hex[:24]}",
                            "object": "fine_tuning.job.checkpoint",
                            "created_at": view["finished_at"],
                            "fine_tuning_job_id": job_id,
                            "step_number": m["step"],
                            "fine_tuned_model_checkpoint": f"{view['fine_tuned_model']}:ckpt-step-{m['step']}",
                            "metrics": {
                                "step": m["step"],
                                "train_loss": m["train_loss"],
                                "valid_loss": m["valid_loss"],
                            },
                        }
                    )
            return self._send(
                200, {"object": "list", "data": list(reversed(data)), "has_more": False}, "jobs.checkpoints"
            )
        self._send(404, _err("404", "Resource not found"), "unknown")

    def _chat(self, deployment: str, body: bytes) -> None:
        fake = self.server_state
        if not fake.deployment_ready(deployment):
            return self._send(
                404,
                _err(
                    "DeploymentNotFound",
                    "The API deployment for this resource does not exist. If you created the "
                    "deployment within the last 5 minutes, please wait a moment and try again.",
                ),
                "chat",
            )
        injected = fake._take_injection("chat")
        if injected:
            status, retry_after = injected
            message = (
                (
                    "Requests to the ChatCompletions_Create Operation have exceeded token rate limit of your current "
                    "pricing tier. "
                    "Please retry after 1 second."
                )
                if status == 429
                else "The server had an error while processing your request."
            )
            return self._send(
                status, _err(str(status), message), "chat", {"Retry-After": retry_after} if retry_after else None
            )
        request = json.loads(body)
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
        self._send(
            200,
            {
                "id": "chatcmpl-" + uuid.uuid4().hex[:24],
                "object": "chat.completion",
                "created": int(time.time()),
                "model": deployment,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "logprobs": None,
                        "message": {"role": "assistant", "content": answer, "refusal": None},
                    }
                ],
                "usage": {
                    "prompt_tokens": len(user) // 4 + 30,
                    "completion_tokens": 1,
                    "total_tokens": len(user) // 4 + 31,
                },
            },
            "chat",
        )
