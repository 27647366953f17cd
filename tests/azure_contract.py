"""Azure's published OpenAPI contract, as the test fake enforces it (tests/openapi/README.md says where
each vendored file comes from).

``Contract.for_plane(Plane.X)`` loads one vendored extract; Swagger 2.0 files (the fine-tuning/files
data plane and the management plane) are converted to OpenAPI 3.0 here, by the standard mapping
(definitions -> components/schemas, body and formData parameters -> requestBody, response schemas
-> content), so that one validator, ``openapi-core``, checks every request the fake receives and
every response it sends. Nothing here decides what is valid: the spec does.
"""

from __future__ import annotations

import copy
import enum
import functools
import json
import os
from typing import Any
from urllib.parse import urlencode

__all__ = ["Contract", "Plane", "swagger2_to_openapi3"]

SPEC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi")


class Plane(enum.Enum):
    """One vendored spec file each, and the path prefix its operations live under."""

    AUTHORING = ("azure-openai-authoring-2024-10-21.json", "/openai")  # files and fine-tuning jobs
    INFERENCE = ("azure-openai-inference-2024-10-21.json", "/openai")  # chat completions
    MANAGEMENT = ("cognitiveservices-management-2024-10-01.json", "")  # ARM: deployments

    @property
    def file(self) -> str:
        return self.value[0]

    @property
    def base_path(self) -> str:
        return self.value[1]


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/definitions/"):
                out[key] = "#/components/schemas/" + value[len("#/definitions/"):]
            else:
                out[key] = _rewrite_refs(value)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node


def _schema(node: dict) -> dict:
    """A Swagger 2.0 schema as OpenAPI 3.0: ``type: file`` is binary, ``x-nullable`` is ``nullable``."""
    node = _rewrite_refs(node)

    def walk(n: Any) -> Any:
        if isinstance(n, dict):
            n = {k: walk(v) for k, v in n.items()}
            if n.get("type") == "file":
                n["type"], n["format"] = "string", "binary"
            if "x-nullable" in n:
                n["nullable"] = bool(n.pop("x-nullable"))
            return n
        if isinstance(n, list):
            return [walk(v) for v in n]
        return n

    return walk(node)


_PARAM_SCHEMA_KEYS = ("type", "format", "enum", "pattern", "minLength", "maxLength", "minimum", "maximum", "default",
                      "items")


def swagger2_to_openapi3(doc: dict, base_path: str) -> dict:
    """The subset of the Swagger 2.0 -> OpenAPI 3.0 mapping these extracts use."""
    shared_params = doc.get("parameters", {})

    def param(p: dict) -> dict:
        if "$ref" in p:
            p = shared_params[p["$ref"].rsplit("/", 1)[-1]]
        return p

    paths: dict = {}
    for route, operations in doc["paths"].items():
        paths[route] = {}
        for method, op in operations.items():
            params = [param(p) for p in op.get("parameters", [])]
            new: dict = {"operationId": op.get("operationId"), "parameters": []}
            form: dict = {"type": "object", "properties": {}, "required": []}
            for p in params:
                if p["in"] == "body":
                    new["requestBody"] = {"required": bool(p.get("required")),
                                          "content": {"application/json": {"schema": _schema(p["schema"])}}}
                elif p["in"] == "formData":
                    form["properties"][p["name"]] = _schema({k: p[k] for k in _PARAM_SCHEMA_KEYS if k in p})
                    if p.get("required"):
                        form["required"].append(p["name"])
                else:
                    new["parameters"].append({
                        "name": p["name"], "in": p["in"], "required": bool(p.get("required")),
                        "schema": {k: p[k] for k in _PARAM_SCHEMA_KEYS if k in p},
                    })
            if form["properties"]:
                if not form["required"]:
                    form.pop("required")
                new["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": form}}}
            produces = op.get("produces") or doc.get("produces") or ["application/json"]
            responses = {}
            for status, response in op["responses"].items():
                out: dict = {"description": response.get("description", status)}
                if "schema" in response:
                    schema = _schema(response["schema"])
                    out["content"] = {media: {"schema": schema} for media in produces}
                if "headers" in response:
                    out["headers"] = {name: {"schema": {k: h[k] for k in ("type", "format") if k in h}}
                                      for name, h in response["headers"].items()}
                responses[status] = out
            new["responses"] = responses
            paths[route][method] = new
    return {
        "openapi": "3.0.3",
        "info": doc["info"],
        "servers": [{"url": base_path or "/"}],
        "paths": paths,
        "components": {"schemas": {name: _schema(s) for name, s in doc.get("definitions", {}).items()}},
    }


@functools.cache
def _document(plane: Plane) -> dict:
    with open(os.path.join(SPEC_DIR, plane.file), encoding="utf-8") as handle:
        doc = json.load(handle)
    if doc.get("swagger") == "2.0":
        doc = swagger2_to_openapi3(doc, plane.base_path)
    else:
        doc = copy.deepcopy(doc)
        doc["servers"] = [{"url": plane.base_path or "/"}]  # the fake's host, not {endpoint}
        for operations in doc["paths"].values():
            for op in operations.values():
                for status, response in op["responses"].items():
                    # Documentation is stripped from the extracts; OpenAPI requires the field.
                    response.setdefault("description", status)
    doc.pop("security", None)  # the fake checks the key itself (and answers 401 as Azure does)
    return doc


class Contract:
    """One plane's spec behind ``openapi-core``: request and response checks that return the errors."""

    def __init__(self, plane: Plane):
        from openapi_core import OpenAPI

        self.plane = plane
        self.document = _document(plane)
        self.api_version = self.document["info"]["version"]
        self.openapi = OpenAPI.from_dict(self.document)

    @classmethod
    @functools.cache
    def for_plane(cls, plane: Plane) -> Contract:
        return cls(plane)

    @staticmethod
    def _werkzeug_request(method: str, path: str, query: dict, headers: dict, body: bytes):
        from werkzeug.test import EnvironBuilder
        from werkzeug.wrappers import Request

        builder = EnvironBuilder(path=path, base_url="http://127.0.0.1", method=method,
                                 query_string=urlencode(query, doseq=True), headers=headers, data=body or None)
        try:
            return Request(builder.get_environ())
        finally:
            builder.close()

    def request_errors(self, method: str, path: str, query: dict, headers: dict, body: bytes) -> list[str]:
        """What the spec says is wrong with this request ([] when it conforms)."""
        from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest

        request = WerkzeugOpenAPIRequest(self._werkzeug_request(method, path, query, headers, body))
        return [_describe(e) for e in self.openapi.iter_request_errors(request)]

    def response_errors(self, method: str, path: str, query: dict, headers: dict, body: bytes, status: int,
                        response_body: bytes, content_type: str) -> list[str]:
        """What the spec says is wrong with a response to this request ([] when it conforms)."""
        from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest, WerkzeugOpenAPIResponse
        from werkzeug.wrappers import Response

        request = WerkzeugOpenAPIRequest(self._werkzeug_request(method, path, query, headers, body))
        response = WerkzeugOpenAPIResponse(Response(response_body, status=status, content_type=content_type))
        return [_describe(e) for e in self.openapi.iter_response_errors(request, response)]

    def schema_errors(self, name: str, value: Any) -> list[str]:
        """Validate ``value`` against ``components/schemas/<name>`` (for bodies no path declares, e.g.
        ARM's Azure-AsyncOperation status resource)."""
        from jsonschema_path import SchemaPath
        from openapi_schema_validator import OAS30Validator

        spec = SchemaPath.from_dict(self.document)
        schema = (spec / "components" / "schemas" / name).read_value()
        resolver_doc = {**self.document}
        validator = OAS30Validator({**schema, "components": resolver_doc["components"]})
        return [e.message for e in validator.iter_errors(value)]


def _describe(error: BaseException) -> str:
    parts = [f"{type(error).__name__}: {error}"]
    cause = error.__cause__
    while cause is not None:
        details = getattr(cause, "schema_errors", None)
        parts.append(f"{type(cause).__name__}: {cause}")
        for detail in details or ():
            parts.append(f"  {detail.message}")
        cause = cause.__cause__
    return "\n".join(parts)
