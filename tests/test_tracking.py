"""``Tracker``: an explicit store, and MLflow's process-wide state left as it was found."""

import os

import pytest

from sparktune.tracking import Tracker, resolve_tracking_uri


@pytest.fixture
def clean_mlflow_uris(monkeypatch):
    """MLflow's module-level URIs and their environment mirrors, unset for the test and put back after."""
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    monkeypatch.setattr(tracking, "_tracking_uri", None)
    monkeypatch.setattr(registry, "_registry_uri", None)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DATABRICKS_RUNTIME_VERSION"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(name, None)  # monkeypatch restores what was there before the test


def test_active_restores_the_tracking_and_the_registry_uri(tmp_path, clean_mlflow_uris):
    import mlflow

    outer_tracking, outer_registry = f"sqlite:///{tmp_path}/outer.db", f"sqlite:///{tmp_path}/outer-registry.db"
    mlflow.set_tracking_uri(outer_tracking)
    mlflow.set_registry_uri(outer_registry)
    tracker = Tracker(f"sqlite:///{tmp_path}/job.db", experiment="active",
                      registry_uri=f"sqlite:///{tmp_path}/job-registry.db")
    run_id = tracker.start_run("r")
    with tracker.active(run_id):
        assert mlflow.active_run().info.run_id == run_id
        assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (tracker.tracking_uri, tracker.registry_uri)
        mlflow.log_param("fluent", "yes")  # a fluent call lands in the tracker's run
    assert mlflow.active_run() is None
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (outer_tracking, outer_registry)
    assert (os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI")) == \
        (outer_tracking, outer_registry)
    assert tracker.get_run(run_id).data.params == {"fluent": "yes"}


def test_active_leaves_unset_uris_unset(tmp_path, clean_mlflow_uris):
    import mlflow
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    tracker = Tracker(f"sqlite:///{tmp_path}/job.db", experiment="unset",
                      registry_uri=f"sqlite:///{tmp_path}/job-registry.db")
    run_id = tracker.start_run()
    with tracker.active(run_id):
        assert mlflow.get_registry_uri() == tracker.registry_uri
    assert (tracking._tracking_uri, registry._registry_uri) == (None, None)
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ


def test_active_restores_the_uris_when_the_block_fails(tmp_path, clean_mlflow_uris):
    import mlflow

    mlflow.set_registry_uri(f"sqlite:///{tmp_path}/outer-registry.db")
    tracker = Tracker(f"sqlite:///{tmp_path}/job.db", registry_uri=f"sqlite:///{tmp_path}/job-registry.db")
    run_id = tracker.start_run()
    with pytest.raises(RuntimeError, match="boom"), tracker.active(run_id):
        raise RuntimeError("boom")
    assert mlflow.get_registry_uri() == f"sqlite:///{tmp_path}/outer-registry.db"
    assert mlflow.active_run() is None


def test_uris_come_from_the_config_then_the_environment(tmp_path, clean_mlflow_uris):
    clean_mlflow_uris.setenv("SPARKTUNE_HOME", str(tmp_path / "home"))
    assert resolve_tracking_uri("") == f"sqlite:///{tmp_path}/home/mlflow.db"
    clean_mlflow_uris.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    assert resolve_tracking_uri("") == "databricks"
    assert Tracker("databricks").registry_uri == "databricks-uc"
    clean_mlflow_uris.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    clean_mlflow_uris.setenv("MLFLOW_REGISTRY_URI", "sqlite:///r.db")
    assert resolve_tracking_uri("") == "http://mlflow:5000" and resolve_tracking_uri("file:///x") == "file:///x"
    assert Tracker(None).registry_uri == "sqlite:///r.db"
    clean_mlflow_uris.setenv("MLFLOW_TRACKING_URI", "")  # empty counts as unset
    assert resolve_tracking_uri("") == "databricks"

