"""Both decoder jobs end to end through `sparktune pipeline`, as their job configs run them, with
the SmolLM2 model swapped for a tiny random decoder (real GPT-2 tokenizer) so each takes about a
minute: LoRA on 2 TorchDistributor ranks (gloo), evaluation in Spark, registration, serving."""

import json
import os

import pandas as pd
import pytest
import yaml
from deltalake import DeltaTable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 128}


def _run_job(config_name, tmp_path, imdb_sample_path, gpt2_tokenizer_path, capsys, *, tiny, targets, extra=()):
    """Run jobs/configs/<config_name> through the CLI on the IMDB sample with a tiny model."""
    from sparktune.cli import main

    with open(os.path.join(ROOT, "jobs", "configs", config_name), encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    config["ingest"].update(source=imdb_sample_path, output=str(tmp_path / "raw"))
    config["tokenize"].update(output=str(tmp_path / "tokens"), tokenizer=gpt2_tokenizer_path, max_length=48)
    model = config["train"]["model"]
    model.update(name=gpt2_tokenizer_path, config_overrides=tiny)
    model.pop("gguf_file")
    config["train"]["lora"]["target_modules"] = targets
    config["evaluate"].update(limit=24, predictions_table=str(tmp_path / "predictions"))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    overrides = [
        f"train.output_dir={tmp_path / 'train'}", "train.train.max_steps=4", "train.train.batch_size=4",
        "train.train.learning_rate=1e-2", "train.data.train_limit=32", "train.data.eval_limit=8",
        "train.checkpoint.strategy=no", "train.mlflow.system_metrics=false", f"register.name={tmp_path.name}",
        *extra,
    ]
    assert main(["pipeline", "--config", str(path), "--json", *overrides]) == 0, capsys.readouterr().err[-3000:]
    return json.loads(capsys.readouterr().out)


@pytest.mark.timeout(600)
def test_decoder_classifier_job_lora_on_two_ranks_with_adapters_saved_apart(
        spark, tmp_path, imdb_sample_path, gpt2_tokenizer_path, mlflow_uri, monkeypatch, capsys):
    import mlflow
    import numpy as np
    from safetensors.torch import load_file

    from sparktune.model import hf

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    result = _run_job("smollm2_classifier_cpu.yaml", tmp_path, imdb_sample_path, gpt2_tokenizer_path, capsys,
                      tiny=TINY_LLAMA, targets=["q_proj", "v_proj"], extra=["train.lora.merge_on_save=false"])
    train = result["train"]
    assert train["world_size"] == 2 and train["rank_steps"] == [4, 4] and train["task"] == "classification"

    # Adapters saved apart: the LoRA weights and the trained head beside a plain base model.
    model_dir = train["model_dir"]
    adapters = load_file(os.path.join(model_dir, "adapter_model.safetensors"))
    assert any("lora_A" in k for k in adapters) and any(".score." in k for k in adapters), sorted(adapters)[:8]
    base = load_file(os.path.join(model_dir, "base", "model.safetensors"))
    assert not any("lora" in k for k in base)

    ev = result["evaluate"]
    assert ev["rows"] == 24 and set(ev["metrics"]) >= {"accuracy", "precision", "recall", "f1"}
    predictions = DeltaTable(str(tmp_path / "predictions")).to_pandas().sort_values("row_id")
    assert ev["metrics"]["accuracy"] == pytest.approx((predictions["prediction"] == predictions["label"]).mean())
    # Spark's executors and this process join base + adapters alike: the same probabilities.
    tokens = DeltaTable(str(tmp_path / "tokens")).to_pandas().set_index("row_id")
    core = hf.load(model_dir, "classification")
    local = hf.classify(core.model, [list(tokens.loc[r, "input_ids"]) for r in predictions["row_id"]], core.pad_id)
    np.testing.assert_allclose(local, np.stack(predictions["probabilities"]), atol=1e-5)

    # The registered artifact (base + adapters) loads and answers like the encoder's.
    model = mlflow.pyfunc.load_model(f"models:/{tmp_path.name}@champion")
    answers = model.predict(pd.DataFrame({"text": ["A wonderful film.", "Dull and far too long."]}))
    assert set(answers["label"]) <= {"negative", "positive"}
    assert all(abs(sum(p) - 1) < 1e-6 for p in answers["probabilities"])
    print("stage seconds", result["seconds"])


@pytest.mark.timeout(600)
def test_generator_job_instruction_tuned_lora_on_two_ranks_scored_and_served(
        spark, tmp_path, imdb_sample_path, gpt2_tokenizer_path, mlflow_uri, monkeypatch, capsys):
    import sys

    import mlflow
    import numpy as np
    import requests
    from test_serve import _free_port, _post, _start, _stop

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    result = _run_job("smollm2_generator_cpu.yaml", tmp_path, imdb_sample_path, gpt2_tokenizer_path, capsys,
                      tiny=TINY_GPT2, targets=["c_attn"])
    train = result["train"]
    assert train["world_size"] == 2 and train["task"] == "instruction"
    assert all(np.isfinite(train["losses"]))

    # The table holds prompt + answer + EOS pairs, the prompt length beside them; reviews are cut, answers never.
    tokens = DeltaTable(str(tmp_path / "tokens")).to_pandas()
    labelled = (DeltaTable(str(tmp_path / "raw")).to_pandas()["label"] >= 0).sum()
    assert len(tokens) == labelled < 340  # unlabelled rows have no answer to learn
    assert tokens["n_tokens"].max() <= 48 and tokens["truncated"].any()
    answer = {0: [4633, 50256], 1: [3967, 50256]}  # " negative" / " positive" + <|endoftext|> in GPT-2's vocabulary
    for ids, n_prompt, label in zip(tokens["input_ids"], tokens["prompt_tokens"], tokens["label"]):
        assert list(ids[n_prompt:]) == answer[label]
    assert os.path.exists(os.path.join(train["model_dir"], "sparktune_prompt.json"))

    # Scored like a classifier (label continuations), plus the held-out prompts' perplexity.
    ev = result["evaluate"]
    assert ev["task"] == "instruction" and ev["rows"] == 24
    assert set(ev["metrics"]) >= {"accuracy", "precision", "recall", "f1", "perplexity", "eval_loss"}
    assert len(ev["confusion_matrix"]) == 2 and sum(map(sum, ev["confusion_matrix"])) == 24
    run = mlflow.MlflowClient(mlflow_uri).get_run(result["run_id"])
    assert run.data.metrics["test/accuracy"] == pytest.approx(ev["metrics"]["accuracy"])
    assert run.data.metrics["test/perplexity"] > 1

    # Served through the same server: the label (scored), generated text only when asked, 4xx for bad input.
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sparktune.cli", "serve", "--model", f"models:/{tmp_path.name}@champion",
           "--tracking-uri", mlflow_uri, "--port", str(port)]
    proc, _ = _start(cmd, tmp_path / "server.log", dict(os.environ, SPARKTUNE_TORCH_THREADS="1"), url, "serve")
    try:
        r = _post(url, {"inputs": ["A wonderful film."]})
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
        assert pred["label"] in ("negative", "positive") and pred["generated_text"] == ""
        r = _post(url, {"inputs": ["A wonderful film."], "params": {"max_new_tokens": 3}})
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
        assert isinstance(pred["generated_text"], str) and len(pred["probabilities"]) == 2
        for bad in ({"inputs": [5]}, {"reviews": ["x"]}, {"inputs": ["x"], "params": {"max_new_tokens": "many"}}):
            r = _post(url, bad)
            assert 400 <= r.status_code < 500, (bad, r.status_code, r.text[:300])
        assert requests.get(url + "/ping", timeout=5).status_code == 200
    finally:
        _stop(proc)
