"""Cut Azure's published OpenAPI specs down to the operations sparktune calls (see README.md).

    python tests/openapi/trim_specs.py /path/to/azure-rest-api-specs/specification [--check]

For each extract in ``EXTRACTS``: keep the listed operations; keep every definition (schema) and
shared parameter they reach through ``$ref``, transitively; inline what they reach in another
file (ARM's common-types) under its own name; replace the schemas named in ``prune`` by ``{}``
(any value: sparktune neither sends nor reads them, and ``{}`` can only make validation less
strict, never stricter than the spec); and drop documentation (``description``, ``summary``,
``title`` below ``info``, ``example(s)``, ``tags``) and vendor extensions (``x-*``). Nothing else
is changed. ``--check`` compares with the vendored files instead of writing them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
_DOC_KEYS = {"description", "summary", "title", "example", "examples", "tags"}


@dataclass(frozen=True)
class Extract:
    source: str  # below specification/
    output: str
    operations: tuple[tuple[str, str], ...]  # (path, method)
    prune: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()  # definitions kept although no kept operation refers to them
    keep_top: tuple[str, ...] = field(default=("swagger", "openapi", "info", "host", "schemes", "consumes",
                                               "produces", "servers", "security", "securityDefinitions"))


_AOAI = "cognitiveservices/data-plane/AzureOpenAI"
_ARM = ("/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.CognitiveServices/"
        "accounts/{accountName}/deployments/{deploymentName}")
EXTRACTS = (
    Extract(
        f"{_AOAI}/authoring/stable/2024-10-21/azureopenai.json", "azure-openai-authoring-2024-10-21.json",
        (("/files", "post"), ("/files/{file-id}", "get"), ("/files/{file-id}/content", "get"),
         ("/fine_tuning/jobs", "post"), ("/fine_tuning/jobs/{fine-tuning-job-id}", "get"),
         ("/fine_tuning/jobs/{fine-tuning-job-id}/events", "get"),
         ("/fine_tuning/jobs/{fine-tuning-job-id}/checkpoints", "get")),
    ),
    Extract(
        f"{_AOAI}/inference/stable/2024-10-21/inference.json", "azure-openai-inference-2024-10-21.json",
        (("/deployments/{deployment-id}/chat/completions", "post"),),
        prune=("azureChatExtensionConfiguration", "azureChatExtensionsMessageContext", "promptFilterResults",
               "contentFilterChoiceResults", "contentFilterPromptResults", "chatCompletionStreamResponseDelta"),
        keep_top=("openapi", "info", "servers", "security"),
    ),
    Extract(
        "cognitiveservices/resource-manager/Microsoft.CognitiveServices/stable/2024-10-01/cognitiveservices.json",
        "cognitiveservices-management-2024-10-01.json",
        ((_ARM, "get"), (_ARM, "put")),
        prune=("CallRateLimit", "ThrottlingRule", "DeploymentCapacitySettings"),
        # ARM's Azure-AsyncOperation status resource (common-types), which the fake serves.
        extra=("../../../../../common-types/resource-management/v2/types.json#/definitions/OperationStatusResult",),
    ),
)


def _strip(node, in_properties: bool = False):
    """Documentation and x- extensions out; a schema's ``properties`` keys are names, kept as they are."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if not in_properties and (key in _DOC_KEYS or key.startswith("x-")):
                continue
            out[key] = _strip(value, in_properties=(key == "properties" and not in_properties))
        return out
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


class _Refs:
    """Follows ``$ref``s from the kept operations; copies what they reach into one document."""

    def __init__(self, root: str, source: str, prune: tuple[str, ...]):
        self.root, self.prune = root, set(prune)
        self.files: dict[str, dict] = {}
        self.source = os.path.normpath(os.path.join(root, source))
        self.doc = self._load(self.source)
        self.swagger = "swagger" in self.doc
        self.schemas: dict = {}
        self.parameters: dict = {}

    def _load(self, path: str) -> dict:
        if path not in self.files:
            with open(path, encoding="utf-8") as handle:
                self.files[path] = json.load(handle)
        return self.files[path]

    def _local(self, section: str, name: str) -> str:
        if section == "parameters":
            return f"#/parameters/{name}"
        return f"#/definitions/{name}" if self.swagger else f"#/components/schemas/{name}"

    def follow(self, node, base: str):
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                is_ref = key == "$ref" and isinstance(value, str)
                out[key] = self.ref(value, base) if is_ref else self.follow(value, base)
            return out
        if isinstance(node, list):
            return [self.follow(v, base) for v in node]
        return node

    def ref(self, ref: str, base: str) -> str:
        file_part, _, pointer = ref.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(base), file_part)) if file_part else base
        parts = pointer.strip("/").split("/")
        section, name = ("parameters" if parts[0] == "parameters" else "schemas"), parts[-1]
        target = self.parameters if section == "parameters" else self.schemas
        if name not in target:
            target[name] = {}  # placeholder first: recursive schemas refer to themselves
            if section == "schemas" and name in self.prune:
                target[name] = {}
            else:
                node = self._load(path)
                for part in parts:
                    node = node[part]
                target[name] = self.follow(copy.deepcopy(node), path)
        return self._local(section, name)


def extract(root: str, spec: Extract) -> dict:
    refs = _Refs(root, spec.source, spec.prune)
    doc = refs.doc
    out = {key: copy.deepcopy(doc[key]) for key in spec.keep_top if key in doc}
    out["paths"] = {}
    for route, method in spec.operations:
        out["paths"].setdefault(route, {})[method] = refs.follow(copy.deepcopy(doc["paths"][route][method]),
                                                                 refs.source)
    for ref in spec.extra:
        refs.ref(ref, refs.source)
    if refs.swagger:
        out["definitions"] = refs.schemas
        if refs.parameters:
            out["parameters"] = refs.parameters
    else:
        out["components"] = {"schemas": refs.schemas}
        if "securitySchemes" in doc.get("components", {}):
            out["components"]["securitySchemes"] = copy.deepcopy(doc["components"]["securitySchemes"])
    info = out.get("info", {})
    out = _strip(out)
    out["info"] = {k: info[k] for k in ("title", "version") if k in info}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specification", help="the specification/ folder of an azure-rest-api-specs checkout")
    parser.add_argument("--check", action="store_true", help="compare with the vendored files, write nothing")
    args = parser.parse_args(argv)
    differ = 0
    for spec in EXTRACTS:
        result = extract(args.specification, spec)
        target = os.path.join(HERE, spec.output)
        if args.check:
            with open(target, encoding="utf-8") as handle:
                same = json.load(handle) == result
            print(f"{spec.output}: {'same' if same else 'DIFFERS'}")
            differ += not same
        else:
            with open(target, "w", encoding="utf-8") as handle:
                json.dump(result, handle, indent=1)
                handle.write("\n")
            print(f"wrote {target}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
