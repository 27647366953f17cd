"""Fixtures both hosted-path test modules use; each module defines its own ``fake`` server."""

import pytest

from sparktune.ingest import ingest
from sparktune.openai.export import ExportSpec, export_chat_jsonl


def make_workspace(spark, imdb_sample_path, root, limit: int, validation_limit: int):
    """A raw table ingested from the IMDB sample and its chat-JSONL export: ``(root, raw, data)``."""
    raw = str(root / "raw")
    ingest(spark, imdb_sample_path, raw)
    data = str(root / "ft")
    export_chat_jsonl(spark, ExportSpec(table=raw, output=data, limit=limit, validation_fraction=0.2,
                                        validation_limit=validation_limit))
    return root, raw, data


@pytest.fixture
def azure_env(monkeypatch, fake):
    """The environment of a user whose Azure OpenAI resource is the module's ``fake``."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AZURE_OPENAI_AD_TOKEN", "MLFLOW_TRACKING_URI",
                 "DATABRICKS_RUNTIME_VERSION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in fake.client_env().items():
        monkeypatch.setenv(name, value)
