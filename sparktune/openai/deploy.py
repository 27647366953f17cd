"""Deploy a fine-tuned model: an Azure OpenAI deployment through the Azure management REST API.

``PUT {management}/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.CognitiveServices/
accounts/{account}/deployments/{name}?api-version=2024-10-01`` with ``{"sku": {"name", "capacity"},
"properties": {"model": {"format": "OpenAI", "name", "version": "1"}}}``. The PUT is a long-running
operation that ends "via azure-async-operation" (the 2024-10-01 spec): when the answer carries an
``Azure-AsyncOperation`` URL on the management host, that operation's ``status`` is polled
(``InProgress`` until ``Succeeded``/``Failed``/``Canceled``, with the service's error on failure),
else the deployment itself, until ``properties.provisioningState`` is ``Succeeded``. The states
that never become ``Succeeded`` by waiting (``Failed``, ``Canceled``, ``Disabled``) stop at once.

Settings come from the environment: ``AZURE_SUBSCRIPTION_ID``, ``AZURE_RESOURCE_GROUP``,
``AZURE_OPENAI_RESOURCE`` (the account name; default: the first label of
``AZURE_OPENAI_ENDPOINT``'s host), and an ARM bearer token in ``AZURE_MANAGEMENT_TOKEN``
(``az account get-access-token --resource https://management.azure.com``) or, when that is
unset and ``azure-identity`` is installed, ``DefaultAzureCredential``.
``AZURE_MANAGEMENT_ENDPOINT`` overrides ``https://management.azure.com`` (sovereign clouds).
The OpenAI platform needs no deployment: a fine-tuned model is called by its name.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from urllib.parse import quote, urlparse

from sparktune.errors import SparktuneError
from sparktune.results import StageResult

__all__ = ["MANAGEMENT_API_VERSION", "DeployResult", "DeploymentSpec", "ManagementTarget", "deploy_model",
           "management_from_env"]

MANAGEMENT_API_VERSION = "2024-10-01"
_RETRY_STATUSES = {429, 500, 502, 503, 504}
# Deployment provisioning states (DeploymentProvisioningState, 2024-10-01) that waiting cannot turn into Succeeded.
_DEAD_STATES = ("Failed", "Canceled", "Disabled")
# ARM async-operation statuses that end the operation.
_OPERATION_DONE = ("Succeeded", "Failed", "Canceled")


@dataclass(frozen=True)
class ManagementTarget:
    endpoint: str
    subscription: str
    resource_group: str
    account: str
    token: str = field(default="", repr=False)

    def deployment_url(self, name: str) -> str:
        return (f"{self.endpoint}/subscriptions/{quote(self.subscription)}/resourceGroups/{quote(self.resource_group)}"
                f"/providers/Microsoft.CognitiveServices/accounts/{quote(self.account)}/deployments/{quote(name)}")


def management_from_env(environ=None) -> ManagementTarget:
    env = os.environ if environ is None else environ
    account = (env.get("AZURE_OPENAI_RESOURCE") or "").strip()
    if not account and env.get("AZURE_OPENAI_ENDPOINT"):
        host = urlparse(env["AZURE_OPENAI_ENDPOINT"]).hostname or ""
        if host.endswith((".openai.azure.com", ".cognitiveservices.azure.com")):
            account = host.split(".")[0]
    missing = [name for name, value in (("AZURE_SUBSCRIPTION_ID", env.get("AZURE_SUBSCRIPTION_ID")),
                                        ("AZURE_RESOURCE_GROUP", env.get("AZURE_RESOURCE_GROUP")),
                                        ("AZURE_OPENAI_RESOURCE", account)) if not (value or "").strip()]
    if missing:
        raise SparktuneError(
            f"deploy needs {', '.join(missing)} in the environment: the Azure subscription id, the resource group and "
            "the "
            "Azure OpenAI resource (account) name that holds the fine-tuned model"
        )
    token = (env.get("AZURE_MANAGEMENT_TOKEN") or "").strip()
    if not token:
        try:
            from azure.identity import DefaultAzureCredential
        except ImportError as exc:
            raise SparktuneError(
                "deploy needs an Azure Resource Manager token: set AZURE_MANAGEMENT_TOKEN "
                "(az account get-access-token --resource https://management.azure.com --query accessToken -o tsv) "
                "or pip install azure-identity to use DefaultAzureCredential"
            ) from exc
        token = DefaultAzureCredential().get_token("https://management.azure.com/.default").token
    endpoint = (env.get("AZURE_MANAGEMENT_ENDPOINT") or "https://management.azure.com").rstrip("/")
    return ManagementTarget(
        endpoint, env["AZURE_SUBSCRIPTION_ID"].strip(), env["AZURE_RESOURCE_GROUP"].strip(), account, token
    )


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    model: str
    sku: str = "standard"
    capacity: int = 1
    model_version: str = "1"

    def check(self) -> None:
        if not self.name or len(self.name) > 64:
            raise SparktuneError(f"--name must be 1 to 64 characters; found {self.name!r}")
        if not self.model:
            raise SparktuneError("--model is empty: give the fine-tuned model name that `sparktune openai follow` "
                                 "printed")
        if self.capacity < 1:
            raise SparktuneError(f"--capacity must be a positive number of capacity units; found {self.capacity}")

    def body(self) -> dict:
        return {
            "sku": {"name": self.sku, "capacity": self.capacity},
            "properties": {"model": {"format": "OpenAI", "name": self.model, "version": self.model_version}},
        }


def _request(http, method: str, url: str, token: str, max_retries: int, params: dict | None = None, **kwargs):
    """One ARM call, retrying 429/5xx with Retry-After (or exponential backoff)."""
    for attempt in range(max_retries + 1):
        response = http.request(method, url, params={"api-version": MANAGEMENT_API_VERSION} if params is None
                                else params, headers={"Authorization": f"Bearer {token}"}, timeout=60, **kwargs)
        if response.status_code not in _RETRY_STATUSES or attempt == max_retries:
            return response
        try:
            delay = float(response.headers.get("Retry-After", ""))
        except ValueError:
            delay = min(30.0, 0.5 * 2 ** attempt)
        time.sleep(max(0.0, min(delay, 60.0)))
    raise AssertionError("unreachable")


def _error_text(response) -> str:
    try:
        err = response.json().get("error", {})
        return f"{err.get('code', response.status_code)}: {err.get('message', response.text[:300])}"
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"


@dataclass
class DeployResult(StageResult):
    """The deployment as Azure (or, on OpenAI, nothing: the model is called by name) left it."""

    name: str
    model: str
    provider: str
    state: str
    sku: str = ""
    capacity: int | None = None
    resource_id: str = ""

    def summary(self) -> str:
        if self.provider != "azure":
            return (f"OpenAI serves fine-tuned models by name: score {self.model} directly "
                    f"(sparktune openai score --deployment {self.model})")
        return (f"deployment {self.name} of {self.model} succeeded (sku {self.sku}, capacity {self.capacity})")


def _operation_url(response, target: ManagementTarget) -> str | None:
    """The PUT's Azure-AsyncOperation URL, when it points at the management host we trust with the token."""
    url = response.headers.get("Azure-AsyncOperation")
    if not url:
        return None
    got, ours = urlparse(url), urlparse(target.endpoint)
    return url if (got.scheme, got.netloc) == (ours.scheme, ours.netloc) else None


def _dead(spec: DeploymentSpec, state: str, detail: str = "") -> SparktuneError:
    hint = {"Disabled": "the resource or its quota disabled it (check the model's deployment quota and the "
                        "resource's status)"}.get(state, "see the resource's activity log in the Azure portal")
    return SparktuneError(f"deployment {spec.name!r} of {spec.model} ended {state}"
                          + (f": {detail}" if detail else "") + f"; {hint}")


def _wait_operation(http, url: str, target: ManagementTarget, spec: DeploymentSpec, start: float, timeout: float,
                    poll_interval: float, max_retries: int, say) -> None:
    """Poll an ARM async operation until it ends; raise with the service's error when it did not succeed."""
    while True:
        response = _request(http, "GET", url, target.token, max_retries, params={})  # the URL has its api-version
        if response.status_code != 200:
            raise SparktuneError(f"reading deployment {spec.name!r}'s operation failed: {_error_text(response)}")
        body = response.json()
        status = str(body.get("status", ""))
        say(f"deployment {spec.name}: operation {status or 'unknown'} ({int(time.monotonic() - start)} s)")
        if status == "Succeeded":
            return
        if status in _OPERATION_DONE:
            err = body.get("error") or {}
            detail = f"{err.get('code', 'error')}: {err.get('message', 'no message')}" if err else ""
            raise _dead(spec, status, detail)
        if time.monotonic() - start > timeout:
            raise SparktuneError(f"deployment {spec.name!r} still {status} after {timeout:.0f} s; run deploy again "
                                 "to keep waiting")
        time.sleep(poll_interval)


def deploy_model(target: ManagementTarget, spec: DeploymentSpec, poll_interval: float = 15.0, timeout: float = 3600.0,
                 max_retries: int = 5, say=print) -> DeployResult:
    """Create or update the deployment and wait until it has succeeded."""
    import requests

    spec.check()
    url = target.deployment_url(spec.name)
    with requests.Session() as http:
        response = _request(http, "PUT", url, target.token, max_retries, json=spec.body())
        if response.status_code not in (200, 201):
            raise SparktuneError(f"deployment {spec.name!r} of {spec.model} was refused: {_error_text(response)}")
        resource = response.json()
        start = time.monotonic()
        operation = _operation_url(response, target)
        if operation:
            _wait_operation(http, operation, target, spec, start, timeout, poll_interval, max_retries, say)
            response = _request(http, "GET", url, target.token, max_retries)
            if response.status_code != 200:
                raise SparktuneError(f"reading deployment {spec.name!r} failed: {_error_text(response)}")
            resource = response.json()
        while True:
            state = resource.get("properties", {}).get("provisioningState", "")
            say(f"deployment {spec.name}: {state or 'unknown'} ({int(time.monotonic() - start)} s)")
            if state == "Succeeded":
                sku = resource.get("sku", {})
                return DeployResult(resource.get("name", spec.name), spec.model, "azure", state,
                                    sku.get("name", spec.sku), sku.get("capacity", spec.capacity),
                                    resource.get("id", ""))
            if state in _DEAD_STATES:
                raise _dead(spec, state)
            if time.monotonic() - start > timeout:
                raise SparktuneError(f"deployment {spec.name!r} still {state} after {timeout:.0f} s; run deploy again "
                                     "to keep waiting")
            time.sleep(poll_interval)
            response = _request(http, "GET", url, target.token, max_retries)
            if response.status_code != 200:
                raise SparktuneError(f"reading deployment {spec.name!r} failed: {_error_text(response)}")
            resource = response.json()
