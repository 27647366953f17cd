"""Issue 18: one owner of "is this a secret" (sparktune.redact), used by MLflow params and tags too."""

from sparktune.redact import REDACTED, is_secret_key
from sparktune.tracking import Tracker, clean_params

PARAMS = {
    "azure.account_key": "c2VjcmV0a2V5",
    "openai.api_key": "abc123",
    "db.password": "pw",
    "hf_token": "hf_x",
    "max_tokens": 512,
    "data.n_tokens": 1000,
    "model.tokenizer": "gpt2",
    "train.total_tokens": 7,
    "tracking": "https://user:hunter2@mlflow.example.com/",
}


def test_clean_params_agrees_with_redact():
    clean = clean_params(PARAMS)
    for key in PARAMS:
        assert (clean[key] == REDACTED) == is_secret_key(key), key
    assert clean["azure.account_key"] == REDACTED and clean["openai.api_key"] == REDACTED
    assert (clean["max_tokens"], clean["data.n_tokens"], clean["model.tokenizer"]) == ("512", "1000", "gpt2")
    assert "hunter2" not in clean["tracking"]


def test_params_and_tags_stored_in_mlflow_are_redacted(mlflow_uri):
    tracker = Tracker(mlflow_uri, "redact")
    run_id = tracker.start_run("r", tags={"azure.account_key": "k", "max_tokens": "5"})
    tracker.log_params(run_id, PARAMS)
    run = tracker.get_run(run_id)
    assert run.data.params["azure.account_key"] == REDACTED
    assert run.data.params["max_tokens"] == "512" and run.data.params["data.n_tokens"] == "1000"
    assert run.data.tags["azure.account_key"] == REDACTED and run.data.tags["max_tokens"] == "5"
    assert "hunter2" not in str(run.data.params)


def test_log_records_are_redacted_once_installed(caplog):
    import logging

    from sparktune.redact import install_log_redaction

    install_log_redaction()
    install_log_redaction()  # idempotent
    with caplog.at_level(logging.INFO):
        logging.getLogger("mlflow.any").info("connecting to %s", "https://user:hunter2@mlflow.example.com/")
        logging.getLogger("sparktune.x").warning("key AccountKey=abc123;rest and max_tokens=5")
    text = caplog.text
    assert "hunter2" not in text and "abc123" not in text
    assert "https://***@mlflow.example.com/" in text and "max_tokens=5" in text


def test_redaction_is_linear_on_long_text():
    """A 1 MB quarantined review went through every rule: quadratic rules never finished."""
    import os
    import subprocess
    import sys

    code = ("import time; from sparktune.redact import redact; t = time.time(); "
            "assert redact('x' * 300_000 + ' password=hunter2').endswith('password=***'); print(time.time() - t)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=root))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout) < 20
