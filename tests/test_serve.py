"""Serve: the real `sparktune serve` process on a free loopback port, real HTTP requests."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import requests

from evalkit import build_classifier

MAX_BODY_MB = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, minilm_path):
    from sparktune.pyfunc_model import save_pyfunc_model

    base = tmp_path_factory.mktemp("serve")
    hf = build_classifier(minilm_path, str(base / "hf"))
    return save_pyfunc_model(hf, str(base / "mlflow_model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve_log") / "server.log"
    env = dict(os.environ, SPARKTUNE_TORCH_THREADS="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sparktune.cli", "serve", "--model", model_dir, "--port", str(port),
             "--max-body-mb", str(MAX_BODY_MB)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(url + "/ping", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"server did not answer /ping in 180 s:\n{log_path.read_text()[-3000:]}")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _post(url, body, content_type="application/json"):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(url + "/invocations", data=data, headers={"Content-Type": content_type}, timeout=60)


def _assert_serves(url, expected=None):
    r = _post(url, {"inputs": ["What a wonderful, moving film."]})
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    if expected is not None:
        assert pred == expected
    return pred


def test_routes_and_formats(server, model_dir):
    import mlflow
    import numpy as np
    import pandas as pd

    assert requests.get(server + "/ping", timeout=5).status_code == 200
    assert requests.get(server + "/health", timeout=5).status_code == 200
    texts = ["What a wonderful, moving film.", "Dull, predictable and far too long."]
    local = mlflow.pyfunc.load_model(model_dir).predict(pd.DataFrame({"text": texts}))
    payloads = [
        {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}},
        {"dataframe_records": [{"text": t} for t in texts]},
        {"inputs": texts},
        {"inputs": {"text": texts}},
    ]
    for payload in payloads:
        r = _post(server, payload)
        assert r.status_code == 200, (payload, r.text)
        preds = r.json()["predictions"]
        assert len(preds) == 2
        for pred, (_, row) in zip(preds, local.iterrows()):
            assert pred["label"] in ("negative", "positive")
            assert pred["label"] == row["label"] and pred["prediction"] == row["prediction"]
            assert len(pred["probabilities"]) == 2 and sum(pred["probabilities"]) == pytest.approx(1.0)
            np.testing.assert_allclose(pred["probabilities"], row["probabilities"], atol=1e-6)


@pytest.mark.parametrize(
    "body, content_type, status, says",
    [
        (b"this is not json", "application/json", 400, "valid JSON"),
        ({"reviews": ["good"]}, "application/json", 400, "exactly one of the input fields"),
        ({"dataframe_records": []}, "application/json", 400, "missing inputs ['text']"),
        ({"inputs": []}, "application/json", 400, "no rows to score"),
        ({"dataframe_records": [{"review": "good"}]}, "application/json", 400, "missing inputs ['text']"),
        ({"inputs": [5, 6]}, "application/json", 400, "expected the review text as a string, found int"),
        ({"dataframe_split": {"columns": ["text"], "data": [[1.5]]}}, "application/json", 400, "found float"),
        ({"dataframe_records": [{"text": None}]}, "application/json", 400, "found NoneType"),
        ([1, 2], "application/json", 400, "Received a list"),
        (b"hello", "text/plain", 415, "only supports"),
        (b'{"inputs": ["' + b"a" * (MAX_BODY_MB * 1024 * 1024 + 10) + b'"]}', "application/json", 413, "over this server's limit"),
    ],
    ids=["not-json", "wrong-field", "empty-records", "empty-inputs", "wrong-column", "ints", "float",
         "null", "top-level-list", "wrong-content-type", "huge-body"],
)
def test_malformed_payloads_get_4xx_and_server_survives(server, body, content_type, status, says):
    before = _assert_serves(server)
    r = _post(server, body, content_type)
    assert r.status_code == status, r.text[:500]
    assert says in r.text
    _assert_serves(server, expected=before)


def test_huge_chunked_body_is_refused(server):
    def chunks():
        yield b'{"inputs": ["'
        for _ in range(MAX_BODY_MB * 4):
            yield b"a" * (256 * 1024)
        yield b'"]}'

    r = requests.post(server + "/invocations", data=chunks(), headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413
    _assert_serves(server)


def test_export_model_has_what_serving_platforms_need(model_dir, tmp_path):
    import yaml

    from sparktune.errors import SparktuneError
    from sparktune.serve import export_model

    out = export_model(model_dir, str(tmp_path / "export"))
    mlmodel = yaml.safe_load(open(os.path.join(out, "MLmodel")))
    assert "python_function" in mlmodel["flavors"]
    assert "text" in mlmodel["signature"]["inputs"] and "probabilities" in mlmodel["signature"]["outputs"]
    reqs = open(os.path.join(out, "requirements.txt")).read()
    assert "mlflow==" in reqs and "torch==" in reqs and "transformers==" in reqs
    assert os.path.exists(os.path.join(out, "serving_input_example.json"))
    with pytest.raises(SparktuneError, match="not empty"):
        export_model(model_dir, out)
