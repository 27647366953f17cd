"""The hosted life cycle through the real openai SDK over real HTTP, against tests/azure_fake.py:
upload -> processed -> job (429 retried) -> follow with events -> MLflow; failed and slow jobs;
deploy through the management REST route; score in Spark with bounded concurrency and retries;
and the planted API key found nowhere: not in output, MLflow's store, or any written file."""

import json
import os
import shutil

import pytest
from azure_fake import FakeAzureOpenAI
from deltalake import DeltaTable
from mlflow import MlflowClient
from openai_fixtures import azure_env, make_workspace  # noqa: F401 (azure_env is a fixture)

from sparktune.cli import main
from sparktune.errors import SparktuneError
from sparktune.evaluate import EvaluateResult, log_evaluation
from sparktune.openai.client import credentials_from_env, parse_result_file
from sparktune.openai.score import parse_answer
from sparktune.tasks import Task
from sparktune.tracking import Tracker

API_KEY = "PLANTED-KEY-7f3a9c1e5b2d4f60a8e1c3b5d7f9a2c4"
MGMT_TOKEN = "PLANTED-ARM-TOKEN-0d9e8f7a6b5c4d3e2f1a"
POLL = "0.1"
pytestmark = pytest.mark.usefixtures("azure_env")  # every test runs as a user of the fake


@pytest.fixture(scope="module")
def fake():
    server = FakeAzureOpenAI(API_KEY, MGMT_TOKEN, stage_s=0.25, slow_s=60.0).start()
    yield server
    server.stop()
    assert not server.violations, server.violations  # the fake answered only what Azure's contract allows
    assert not server.rejected, server.rejected  # and sparktune sent only what it accepts


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store (SQLite + artifacts beside it) for the module: creating one costs seconds."""
    folder = tmp_path_factory.mktemp("openai_mlflow")
    return f"sqlite:///{folder / 'mlflow.db'}", folder


@pytest.fixture(scope="module")
def workspace(spark, imdb_sample_path, tmp_path_factory):
    return make_workspace(spark, imdb_sample_path, tmp_path_factory.mktemp("openai_life"), 40, 12)



def _copy(data, dest):
    shutil.copytree(data, dest)
    return str(dest)


def _files_containing(root, needle: bytes):
    hits = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                if needle in handle.read():
                    hits.append(path)
    return hits


def test_full_life_cycle(spark, fake, workspace, store, tmp_path, capfd):
    root, raw, data = workspace
    mlflow_uri, store_folder = store
    data = _copy(data, tmp_path / "ft")
    tracking = ["--tracking-uri", mlflow_uri, "--experiment", "imdb-compare"]

    # submit + follow; the job creation first gets a 429 with Retry-After, which the SDK waits out.
    fake.inject("jobs.create", 429, times=1, retry_after="1")
    rc = main(["openai", "submit", "--data", data, "--suffix", "imdb", "--epochs", "2", "--batch-size", "4",
               "--learning-rate-multiplier", "1.5", "--seed", "7", "--wait", "--poll-interval", POLL] + tracking)
    out = capfd.readouterr()
    assert rc == 0, out.err
    assert fake.count("jobs.create", 429) == 1 and fake.count("jobs.create", 201) == 1
    assert fake.count("files.create", 201) == 2 and fake.count("files.retrieve") >= 2
    job_id = out.out.split("job_id: ")[1].split()[0]
    run_id = out.out.split("run_id: ")[1].split()[0]
    assert "Step 12/12: training loss=" in out.out and "The job has successfully completed" in out.out
    assert f"job {job_id}: running" in out.out and f"job {job_id}: succeeded" in out.out
    with open(os.path.join(data, "job.json")) as handle:
        record = json.load(handle)
    assert record["job_id"] == job_id and record["fine_tuned_model"].startswith("gpt-4o-mini-2024-07-18.ft-")
    job = fake.jobs[job_id]
    assert (
        job["hyperparameters"] == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.5} and job["seed"] == 7
    )

    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["sparktune.openai.job_id"] == job_id
    assert run.data.tags["sparktune.openai.status"] == "succeeded"
    assert run.data.params["base_model"] == "gpt-4o-mini-2024-07-18" and run.data.params["epochs"] == "2"
    assert run.data.params["training_file_id"] == job["training_file"] and run.data.params["source_table"] == raw
    assert len(client.get_metric_history(run_id, "train/loss")) == 12
    assert len(client.get_metric_history(run_id, "validation/token_accuracy")) == 12
    assert client.get_metric_history(run_id, "train/loss")[-1].step == 12
    assert "validation/full_loss" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run_id, "openai")}
    assert {
        "openai/job.json",
        "openai/checkpoints.json",
        "openai/validation_report.json",
        "openai/export_manifest.json",
    } <= artifacts
    assert fake.count("jobs.checkpoints", 200) == 1

    # deploy through the management route (one 429 first), then wait until it succeeded
    fake.inject("mgmt.put", 429, times=1, retry_after="1")
    assert (
        main(["openai", "deploy", "--data", data, "--name", "imdb-ft", "--capacity", "2", "--poll-interval", POLL]) == 0
    )
    out = capfd.readouterr()
    assert "deployment imdb-ft of gpt-4o-mini-2024-07-18.ft-" in out.out and "succeeded" in out.out
    (key,) = [k for k in fake.deployments if k[3] == "imdb-ft"]
    assert key[:3] == ("00000000-1111-2222-3333-444444444444", "rg-sparktune", "aoai-sparktune")
    assert fake.deployment_view(key)["sku"] == {"name": "standard", "capacity": 2}
    assert fake.count("mgmt.put", 429) == 1 and fake.count("mgmt.get", 200) >= 1

    # the open model's run in the same experiment, logged by `sparktune evaluate`'s own logger
    exp = client.get_experiment_by_name("imdb-compare")
    open_run = client.create_run(exp.experiment_id, run_name="MiniLM (open)").info.run_id
    log_evaluation(Tracker(mlflow_uri, "imdb-compare"), open_run, EvaluateResult(
        model_uri="runs:/x/model", model_version="", task=Task.CLASSIFICATION, table=raw, table_version=0,
        split="test", rows=100, metrics={"accuracy": 0.81, "precision": 0.8, "recall": 0.82, "f1": 0.805},
        per_class={"negative": {"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 50},
                   "positive": {"precision": 0.8, "recall": 0.84, "f1": 0.81, "support": 50}},
        labels=["negative", "positive"], confusion_matrix=[[40, 10], [8, 42]]))

    # score: 2 Spark tasks x 2 threads, two 429s and a 500 on the way. Each answer takes 0.2 s here
    # (0.02 s elsewhere) so that concurrent requests overlap even on a loaded machine: the check
    # below that more than one chat was in flight at once must not depend on the scheduler.
    fake.chat_delay_s = 0.2
    fake.inject("chat", 429, times=2, retry_after="1")
    fake.inject("chat", 500, times=1)
    predictions = str(root / "predictions")
    rc = main(
        [
            "openai",
            "score",
            "--table",
            raw,
            "--deployment",
            "imdb-ft",
            "--data",
            data,
            "--predictions",
            predictions,
            "--concurrency",
            "4",
            "--partitions",
            "2",
            "--compare",
            open_run,
        ]
        + tracking
    )
    fake.chat_delay_s = 0.02
    out = capfd.readouterr()
    assert rc == 0, out.err
    table = DeltaTable(predictions).to_pandas()
    rows = DeltaTable(raw).to_pandas()
    test_rows = rows[(rows.split == "test") & (rows.label >= 0)]
    assert sorted(table.row_id) == sorted(test_rows.row_id)
    expected = {r.row_id: parse_answer(fake.answer(r.text), ["negative", "positive"]) for r in test_rows.itertuples()}
    assert {r.row_id: r.prediction for r in table.itertuples()} == expected
    assert table.error.isna().all()
    unparsed = sum(1 for v in expected.values() if v < 0)
    assert unparsed > 0 and int((~table.parsed).sum()) == unparsed
    accuracy = float((table.prediction == table.label).mean())
    assert 1 < fake.max_concurrent_chats <= 4
    assert fake.count("chat", 429) == 2 and fake.count("chat", 500) == 1

    metrics = client.get_run(run_id).data.metrics  # the job's run: one run per hosted model
    assert metrics["test/accuracy"] == pytest.approx(accuracy)
    assert client.get_run(run_id).data.tags["sparktune.test.rows"] == str(len(test_rows))
    assert metrics["test/unparsed"] == unparsed
    assert metrics["test/retries"] == 3  # the preflight request and the Spark tasks together
    # One metric naming: the hosted run has every metric evaluate gave the open model, under the same key.
    open_metrics = client.get_run(open_run).data.metrics
    assert "test/precision/negative" in open_metrics and set(open_metrics) <= set(metrics)
    assert f"unparsed answers {unparsed}" in out.out and "confusion matrix" in out.out
    lines = out.out.splitlines()
    hosted = next(line for line in lines if line.startswith("imdb-ft (hosted)"))
    opened = next(line for line in lines if line.startswith("MiniLM (open)"))
    assert f"{accuracy:.4f}" in hosted and "0.8100" in opened

    # The key is nowhere: output, MLflow's database and artifacts, the export folder, the tables.
    for needle in (API_KEY, MGMT_TOKEN):
        assert needle not in out.out + out.err
        assert not _files_containing(str(store_folder), needle.encode())  # MLflow's database and artifacts
        assert not _files_containing(str(tmp_path), needle.encode())  # the export folder and job.json
        assert not _files_containing(str(root), needle.encode())  # raw, predictions, export


def test_failed_job_shows_the_service_error_and_fails_the_run(fake, workspace, store, tmp_path, capfd):
    _, _, data = workspace
    mlflow_uri, _ = store
    data = _copy(data, tmp_path / "ft")
    rc = main(["openai", "submit", "--data", data, "--suffix", "fail", "--wait", "--poll-interval", POLL,
               "--tracking-uri", mlflow_uri])
    out = capfd.readouterr()
    assert rc == 2
    assert "failed: invalid_training_file: The job failed due to an invalid training file." in out.err
    run_id = out.out.split("run_id: ")[1].split()[0]
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["sparktune.openai.status"] == "failed"
    assert "invalid training file" in run.data.tags["sparktune.openai.error"]


def test_slow_job_follow_times_out_and_can_be_followed_again(fake, workspace, store, tmp_path, capfd):
    _, _, data = workspace
    mlflow_uri, _ = store
    data = _copy(data, tmp_path / "ft")
    assert (
        main(
            [
                "openai",
                "submit",
                "--data",
                data,
                "--suffix",
                "slow",
                "--tracking-uri",
                mlflow_uri,
                "--poll-interval",
                POLL,
            ]
        )
        == 0
    )
    capfd.readouterr()
    rc = main(
        ["openai", "follow", "--data", data, "--poll-interval", "0.2", "--timeout", "1.5", "--tracking-uri", mlflow_uri]
    )
    out = capfd.readouterr()
    assert rc == 2
    with open(os.path.join(data, "job.json")) as handle:
        job_id = json.load(handle)["job_id"]
    assert f"job {job_id} is still running" in out.err and f"sparktune openai follow --job {job_id}" in out.err
    assert "Step 1/12" not in out.out or "running" in out.out  # progress was printed while it ran
    assert f"job {job_id}: running" in out.out


def test_missing_credentials_fail_before_any_request(fake, workspace, monkeypatch, tmp_path, capfd):
    _, _, data = workspace
    for name in ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_AD_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    before = len(fake.requests)
    assert main(["openai", "submit", "--data", data]) == 2
    assert "no API credentials (environment): for Azure OpenAI set AZURE_OPENAI_ENDPOINT" in capfd.readouterr().err
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", fake.endpoint)
    assert main(["openai", "score", "--table", "./nowhere", "--deployment", "x"]) == 2
    assert "neither AZURE_OPENAI_API_KEY nor AZURE_OPENAI_AD_TOKEN" in capfd.readouterr().err
    assert len(fake.requests) == before


def test_entra_token_wrong_key_and_unknown_deployment(fake, workspace, monkeypatch, capfd):
    _, raw, _ = workspace
    monkeypatch.delenv("AZURE_OPENAI_API_KEY")
    monkeypatch.setenv("AZURE_OPENAI_AD_TOKEN", "entra-token-123")
    creds = credentials_from_env()
    assert "Entra ID token" in creds.describe() and "entra-token-123" not in repr(creds)
    fake.ad_token = "entra-token-123"
    page = creds.client().files.create(file=("t.jsonl", b'{"messages": []}\n'), purpose="fine-tune")
    assert page.id.startswith("file-")
    assert main(["openai", "score", "--table", raw, "--deployment", "missing", "--no-mlflow"]) == 2
    assert "--deployment 'missing' was not found" in capfd.readouterr().err
    monkeypatch.setenv("AZURE_OPENAI_AD_TOKEN", "wrong")
    assert main(["openai", "score", "--table", raw, "--deployment", "missing", "--no-mlflow"]) == 2
    assert "refused the credentials" in capfd.readouterr().err


def test_result_file_and_answer_parsing():
    import base64

    csv_text = "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n1,0.9,0.5,1.0,0.4\n2,0.5,0.7,,\n"
    expected = [
        (1, {"train/loss": 0.9, "train/token_accuracy": 0.5, "validation/loss": 1.0, "validation/token_accuracy": 0.4}),
        (2, {"train/loss": 0.5, "train/token_accuracy": 0.7}),
    ]
    assert parse_result_file(csv_text) == expected
    assert parse_result_file(base64.b64encode(csv_text.encode())) == expected  # Azure's encoding
    names = ["negative", "positive"]
    assert [
        parse_answer(a, names)
        for a in [
            "positive",
            "Negative.",
            "The sentiment is positive",
            "positive or negative",
            "I cannot tell.",
            "",
            None,
        ]
    ] == [1, 0, 1, -1, -1, -1, -1]
    with pytest.raises(SparktuneError, match="AZURE_OPENAI_ENDPOINT must be a URL"):
        credentials_from_env(environ={"AZURE_OPENAI_ENDPOINT": "myresource", "AZURE_OPENAI_API_KEY": "k"})
