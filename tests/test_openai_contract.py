"""The hosted path against responses Azure's published contract allows (tests/openapi/), served by the
strict fake: optional fields left out, paged event lists, a result file that cannot be read,
deployments that end Disabled or report their outcome through Azure-AsyncOperation; and the fake
itself refusing what Azure refuses. Every ``openai`` subcommand prints one JSON object with --json."""

import json
import os
import shutil
import time

import pytest
import requests
from azure_contract import Contract, Plane
from azure_fake import FakeAzureOpenAI
from mlflow import MlflowClient
from openai_fixtures import azure_env, make_workspace  # noqa: F401 (azure_env is a fixture)

from sparktune.cli import main
from sparktune.openai.client import JobStatus

API_KEY = "PLANTED-KEY-0c4d2e8f1a3b5c7d9e0f2a4b6c8d0e1f"
MGMT_TOKEN = "PLANTED-ARM-TOKEN-9a8b7c6d5e4f3a2b1c0d"
POLL = "0.1"
pytestmark = pytest.mark.usefixtures("azure_env")  # every test runs as a user of the fake
FINETUNING_STATES = {"created", "pending", "running", "succeeded", "cancelled", "failed"}  # the 2024-10-21 enum


@pytest.fixture(scope="module")
def fake():
    server = FakeAzureOpenAI(API_KEY, MGMT_TOKEN, stage_s=0.2).start()
    yield server
    server.stop()
    assert not server.violations, server.violations


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('contract_mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def workspace(spark, imdb_sample_path, tmp_path_factory):
    return make_workspace(spark, imdb_sample_path, tmp_path_factory.mktemp("openai_contract"), 30, 10)



@pytest.fixture
def steer(fake):
    """Fake settings a test changes, restored afterwards (the fake is shared by the module)."""
    saved = (fake.omit_file_bytes, fake.omit_list_data, fake.deploy_outcome, fake.async_operation, fake.steps)
    yield fake
    fake.omit_file_bytes, fake.omit_list_data, fake.deploy_outcome, fake.async_operation, fake.steps = saved


def _copy(data, dest):
    shutil.copytree(data, dest)
    return str(dest)


def _record(data):
    with open(os.path.join(data, "job.json")) as handle:
        return json.load(handle)


def _wait_for(fake, job_id, status="succeeded", timeout=30.0):
    deadline = time.monotonic() + timeout
    while fake.job_view(job_id)["status"] != status:
        assert time.monotonic() < deadline, fake.job_view(job_id)
        time.sleep(0.05)


def test_the_fake_refuses_what_azure_refuses(fake):
    base = f"{fake.endpoint}/openai"
    key = {"api-key": API_KEY}
    # an api-version the contract does not have
    r = requests.get(f"{base}/files/file-x", params={"api-version": "2023-05-15"}, headers=key, timeout=10)
    assert r.status_code == 404 and "2024-10-21" in r.json()["error"]["message"]
    # no api-version at all
    assert requests.get(f"{base}/files/file-x", headers=key, timeout=10).status_code == 404
    # an upload whose purpose the spec does not list, and one without the file part
    r = requests.post(f"{base}/files", params={"api-version": "2024-10-21"}, headers=key, timeout=10,
                      files={"file": ("t.jsonl", b'{"messages": []}\n')}, data={"purpose": "training"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalidPayload"
    r = requests.post(f"{base}/files", params={"api-version": "2024-10-21"}, headers=key, timeout=10,
                      data={"purpose": "fine-tune"}, files={"other": ("x", b"")})
    assert r.status_code == 400
    # a job without its required training file, and one whose epochs are not an integer
    for body in ({"model": "gpt-4o-mini"}, {"model": "m", "training_file": "f", "hyperparameters": {"n_epochs": "2"}}):
        r = requests.post(f"{base}/fine_tuning/jobs", params={"api-version": "2024-10-21"}, headers=key, json=body,
                          timeout=10)
        assert r.status_code == 400, r.text
    # chat bodies: no messages, an unknown role, a temperature above 2
    for body in ({"max_tokens": 5}, {"messages": [{"role": "robot", "content": "hi"}]},
                 {"messages": [{"role": "user", "content": "hi"}], "temperature": 3}):
        r = requests.post(f"{base}/deployments/any/chat/completions", params={"api-version": "2024-10-21"},
                          headers=key, json=body, timeout=10)
        assert r.status_code == 400, (body, r.text)
    # a deployment PUT whose sku has no name; a management call on a data-plane api-version
    arm = (f"{fake.endpoint}/subscriptions/s/resourceGroups/rg/providers/Microsoft.CognitiveServices/accounts/a1"
           "/deployments/d")
    auth = {"Authorization": f"Bearer {MGMT_TOKEN}"}
    r = requests.put(arm, params={"api-version": "2024-10-01"}, headers=auth, json={"sku": {"capacity": 1}},
                     timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidRequestContent"
    r = requests.get(arm, params={"api-version": "2024-10-21"}, headers=auth, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidApiVersionParameter"
    assert len(fake.rejected) >= 10
    fake.rejected.clear()
    # the contract's own enum is what the fake's jobs move through
    schema = Contract.for_plane(Plane.AUTHORING).document["components"]["schemas"]["FineTuningState"]
    assert set(schema["enum"]) == FINETUNING_STATES
    assert {s.value for s in JobStatus} >= FINETUNING_STATES


def test_submit_survives_files_without_bytes_and_lists_without_data(fake, steer, workspace, store,
                                                                    tmp_path, capfd):
    _, _, data = workspace
    data = _copy(data, tmp_path / "ft")
    fake.omit_file_bytes, fake.omit_list_data = True, True  # both optional in the 2024-10-21 contract
    rc = main(["openai", "submit", "--data", data, "--suffix", "nobytes", "--wait", "--poll-interval", POLL,
               "--tracking-uri", store])
    out = capfd.readouterr()
    assert rc == 0, out.err
    assert "size not reported" in out.out
    record = _record(data)
    assert record["fine_tuned_model"].endswith("-nobytes")
    client = MlflowClient(store)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["sparktune.openai.status"] == "succeeded"
    local = client.download_artifacts(record["run_id"], "openai/checkpoints.json", str(tmp_path))
    with open(local) as handle:
        assert json.load(handle) == []  # the service listed none: nothing to record, nothing crashed
    seen = {status for method, route, status in fake.requests if route == "jobs.retrieve"}
    assert seen == {200}


def test_follow_records_the_model_and_ends_the_run_when_the_result_file_fails(fake, steer, workspace, store,
                                                                              tmp_path, capfd):
    _, _, data = workspace
    data = _copy(data, tmp_path / "ft")
    assert main(["openai", "submit", "--data", data, "--suffix", "noresults", "--poll-interval", POLL,
                 "--tracking-uri", store]) == 0
    capfd.readouterr()
    record = _record(data)
    _wait_for(fake, record["job_id"])
    fake.inject("files.content", 404)  # the result file is not (yet) available
    rc = main(["openai", "follow", "--data", data, "--poll-interval", POLL, "--tracking-uri", store])
    out = capfd.readouterr()
    assert rc == 0, out.err
    assert fake.count("files.content", 404) == 1
    assert "warning: the job's result file" in out.out and "no per-step metrics were logged" in out.out
    record = _record(data)
    assert record["fine_tuned_model"].endswith("-noresults")  # deploy can find the model
    run = MlflowClient(store).get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["sparktune.openai.fine_tuned_model"] == record["fine_tuned_model"]
    assert "result file" in run.data.tags["sparktune.openai.warning"]
    assert "train/loss" not in run.data.metrics


def test_events_are_paged_through(fake, steer, workspace, store, tmp_path, capfd):
    _, _, data = workspace
    data = _copy(data, tmp_path / "ft")
    fake.steps = 150  # 154 events: more than one page of 100
    assert main(["openai", "submit", "--data", data, "--suffix", "paged", "--poll-interval", POLL,
                 "--tracking-uri", store]) == 0
    capfd.readouterr()
    record = _record(data)
    _wait_for(fake, record["job_id"])
    before = fake.count("jobs.events")
    assert main(["openai", "follow", "--data", data, "--poll-interval", POLL, "--tracking-uri", store]) == 0
    out = capfd.readouterr().out
    assert fake.count("jobs.events") - before >= 2
    steps = [line for line in out.splitlines() if "Step " in line]
    assert len(steps) == 150 and "Step 1/150" in steps[0] and "Step 150/150" in steps[-1]
    assert "Job enqueued" in out and "successfully completed" in out
    assert len(MlflowClient(store).get_metric_history(record["run_id"], "train/loss")) == 150


@pytest.fixture(scope="module")
def succeeded(fake, workspace, store, tmp_path_factory):
    """An export folder whose job succeeded (job.json has the model): what deploy starts from."""
    _, _, data = workspace
    data = _copy(data, tmp_path_factory.mktemp("deployable") / "ft")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in fake.client_env().items():
            mp.setenv(name, value)
        assert main(["openai", "submit", "--data", data, "--suffix", "deploy", "--wait", "--poll-interval", POLL,
                     "--tracking-uri", store]) == 0
    return data


def test_a_disabled_deployment_stops_at_once(fake, steer, succeeded, capfd):
    fake.deploy_outcome, fake.async_operation = "Disabled", False
    capfd.readouterr()
    start = time.monotonic()
    rc = main(["openai", "deploy", "--data", succeeded, "--name", "ft-disabled", "--poll-interval", POLL,
               "--timeout", "60"])
    err = capfd.readouterr().err
    assert rc == 2 and time.monotonic() - start < 20
    assert "ended Disabled" in err and "quota" in err and "after 60 s" not in err


def test_deploy_follows_the_azure_async_operation(fake, steer, succeeded, capfd):
    fake.deploy_outcome = "Failed"
    rc = main(["openai", "deploy", "--data", succeeded, "--name", "ft-failing", "--poll-interval", POLL])
    err = capfd.readouterr().err
    assert rc == 2
    assert fake.count("mgmt.operation", 200) >= 1
    assert "DeploymentFailed: The deployment ended Failed: capacity is not available" in err
    fake.deploy_outcome = "Succeeded"
    before = fake.count("mgmt.operation", 200)
    assert main(["openai", "deploy", "--data", succeeded, "--name", "ft-ok", "--poll-interval", POLL]) == 0
    assert fake.count("mgmt.operation", 200) > before
    assert "deployment ft-ok of" in capfd.readouterr().out


def test_every_openai_subcommand_prints_one_json_object(fake, workspace, store, tmp_path, capfd):
    _, raw, _ = workspace
    data = str(tmp_path / "ft")
    common = ["--tracking-uri", store, "--json"]
    steps = [
        ("export", ["--table", raw, "--output", data, "--limit", "20", "--validation-fraction", "0.2"]),
        ("validate", ["--data", data]),
        ("submit", ["--data", data, "--suffix", "json", "--wait", "--poll-interval", POLL]),
        ("follow", ["--data", data, "--poll-interval", POLL]),
        ("deploy", ["--data", data, "--name", "ft-json", "--poll-interval", POLL]),
        ("score", ["--table", raw, "--deployment", "ft-json", "--data", data, "--limit", "12"]),
    ]
    results = {}
    for name, args in steps:
        rc = main(["openai", name, *args, *common])
        out = capfd.readouterr()
        assert rc == 0, (name, out.err)
        assert len(out.out.strip().splitlines()) == 1, (name, out.out)  # everything else went to stderr
        results[name] = json.loads(out.out)
    assert results["export"]["train_rows"] == 20 and results["export"]["validation"]["train"]["examples"] == 20
    assert results["validate"]["errors"] == []
    assert results["submit"]["followed"]["status"] == "succeeded"
    assert results["follow"]["fine_tuned_model"] == results["submit"]["followed"]["fine_tuned_model"]
    assert results["deploy"]["state"] == "Succeeded" and results["deploy"]["name"] == "ft-json"
    score = results["score"]
    assert score["evaluation"]["rows"] == 12 and 0 <= score["evaluation"]["metrics"]["accuracy"] <= 1
    assert score["run_id"] == results["submit"]["run_id"]  # logged into the job's run
