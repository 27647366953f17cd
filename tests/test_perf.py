"""Issue 12: the bf16 rule, session-core planning without Spark jobs, and the benchmarks' --quick modes.

The quick modes run the real scripts end to end on tiny inputs (no timing assertions): they exist
so the BENCHMARKS.md commands never rot.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# bf16 ------------------------------------------------------------------------------------------
def test_resolve_bf16_rule(monkeypatch):
    from sparktune.model import hf

    native = hf.native_bf16("cpu")
    assert hf.resolve_bf16("auto", "cpu") is native and hf.resolve_bf16("", "cpu") is native
    assert hf.resolve_bf16(True, "cpu") is True and hf.resolve_bf16("false", "cpu") is False
    monkeypatch.setenv(hf.BF16_ENV, "true")
    assert hf.resolve_bf16(None, "cpu") is True
    monkeypatch.setenv(hf.BF16_ENV, "off")
    assert hf.resolve_bf16(None, "cpu") is False
    monkeypatch.setenv(hf.BF16_ENV, "maybe")
    with pytest.raises(ValueError, match="SPARKTUNE_BF16"):
        hf.resolve_bf16(None, "cpu")
    assert hf.native_bf16("mps") is False


def test_train_bf16_config_key():
    from sparktune.errors import ConfigError
    from sparktune.model import hf
    from sparktune.train.config import load_train_config
    from sparktune.train.recipe import train_bf16

    base = ["output_dir=/o", "model.name=m", "data.table=/t"]
    cfg = load_train_config(None, base)
    assert cfg.train.bf16 == "auto" and train_bf16(cfg, gpu=False) is hf.native_bf16("cpu")
    assert train_bf16(load_train_config(None, base + ["train.bf16=false"]), gpu=False) is False
    assert train_bf16(load_train_config(None, base + ["train.bf16=true"]), gpu=False) is True
    # fp16 with the default auto: fp16 wins instead of a conflict
    assert train_bf16(load_train_config(None, base + ["train.fp16=true"]), gpu=False) is False
    with pytest.raises(ConfigError, match="train.bf16"):
        load_train_config(None, base + ["train.bf16=sometimes"])
    with pytest.raises(ConfigError, match="train.bf16"):
        load_train_config(None, base + ["train.bf16=true", "train.fp16=true"])


def test_inference_in_bf16_matches_fp32(tmp_path, minilm_path):
    """The same classifier loaded with bf16 weights gives probabilities close to fp32's."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparktune.model import hf

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path)
    fp32 = hf.load(str(tmp_path), hf.CLASSIFICATION, 64, bf16=False)
    bf16 = hf.load(str(tmp_path), hf.CLASSIFICATION, 64, bf16=True)
    assert bf16.bf16 and not fp32.bf16 and bf16 is not fp32
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    texts = ["a wonderful film", "dull and far too long", "I have seen better"]
    p32 = hf.classify(fp32.model, hf.encode(fp32.tokenizer, texts, 64), fp32.pad_id)
    p16 = hf.classify(bf16.model, hf.encode(bf16.tokenizer, texts, 64), bf16.pad_id)
    assert p16.dtype == p32.dtype and abs(p16 - p32).max() < 0.05


# tokenize planning -------------------------------------------------------------------------------
def test_session_cores_from_settings(spark):
    from sparktune.tokenize import _session_cores

    assert _session_cores(spark) == 2  # the fixture's local[2], read from the settings


# benchmarks' quick modes -------------------------------------------------------------------------
def _run_quick(script: str, home, *extra: str, timeout: int = 600) -> dict:
    # A home of its own: the Spark session of this pytest process holds the Derby metastore in
    # the shared one, and a second JVM on it fails at its first catalog access.
    env = dict(os.environ, PYTHONPATH=ROOT, SPARKTUNE_HOME=str(home))
    done = subprocess.run([sys.executable, f"bench/{script}", "--quick", *extra], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def test_bench_bf16_quick(tmp_path):
    out = tmp_path / "bf16.json"
    _run_quick("bench_bf16.py", tmp_path / "home", "--json", str(out))
    result = json.loads(out.read_text())
    for key in ("train_fp32_samples_per_s", "train_bf16_samples_per_s", "inference_bf16_rows_per_s",
                "request_fp32_p50_ms"):
        assert result[key] > 0
    assert result["auto_resolves_to"] in ("bf16", "fp32") and 0 <= result["inference_bf16_agreement"] <= 1


def test_bench_tokenize_quick(tmp_path):
    out = tmp_path / "tok.json"
    _run_quick("bench_tokenize.py", tmp_path / "home", "--json", str(out), "--workdir", str(tmp_path / "work"))
    report = json.loads(out.read_text())
    (res,) = report["results"]
    assert res["rows"] > 0 and res["spark_rows_per_s"] > 0 and res["seed_rows_per_s"] > 0
    assert res["spark_table_mb"] > 0 and res["seed_padded_mb_full_corpus"] > res["spark_table_mb"]


def test_bench_train_efficiency_quick(tmp_path):
    out = tmp_path / "eff.json"
    _run_quick("bench_train_efficiency.py", tmp_path / "home", "--json", str(out))
    report = json.loads(out.read_text())
    assert report["peak"]["fp32"]["2"]["gflops"] > 0 and report["dropout_ab"]["speedup"] > 0
    for arm in report["arms"]:
        assert arm["model_gflops"] > 0 and 0 < arm["share_of_fp32_peak"]
        assert 0.99 < sum(arm["phases_share"].values()) < 1.01 and arm["trainer_step_s"] is None


# pipeline summary ----------------------------------------------------------------------------------
def test_pipeline_summary_splits_fixed_overhead_from_work():
    from sparktune.pipeline import PipelineResult

    result = PipelineResult(seconds={"ingest": 10.0, "tokenize": 20.0, "train": 60.0, "evaluate": 5.0, "register": 1.0},
                            overhead={"spark_start": 3.0, "mlflow_setup": 1.0, "train_setup": 20.0})
    assert result.setup_seconds == 4.0
    text = result.summary()
    assert "setup" in text and "total         100.0" in text
    assert "fixed overhead 24.0 s (24.0%: spark_start 3.0, mlflow_setup 1.0, train_setup 20.0); work 76.0 s" in text


# attention dropout: the largest loss of a CPU training step -----------------------------------------
def test_attention_dropout_key_reaches_the_model(minilm_path):
    from transformers import AutoTokenizer

    from sparktune.errors import ConfigError
    from sparktune.tasks import Task
    from sparktune.train.config import load_train_config
    from sparktune.train.model import build_model

    tok = AutoTokenizer.from_pretrained(minilm_path)
    base = ["output_dir=/o", "data.table=/t", f"model.name={minilm_path}"]
    own = build_model(load_train_config(None, base + ["model.attention_dropout=null"]), Task.CLASSIFICATION, tok)
    assert own.config.attention_probs_dropout_prob == 0.1  # the model's own when the key is null
    default = build_model(load_train_config(None, base), Task.CLASSIFICATION, tok)
    assert default.config.attention_probs_dropout_prob == 0.0  # auto: 0 on CPU (these tests run on CPU)
    assert default.bert.encoder.layer[0].output.dropout.p == 0.1  # hidden-state dropout stays the model's own
    model = build_model(load_train_config(None, base + ["model.attention_dropout=0"]), Task.CLASSIFICATION, tok)
    assert model.config.attention_probs_dropout_prob == 0.0
    attention = model.bert.encoder.layer[0].attention.self
    assert attention.dropout.p == 0.0 and model.bert.encoder.layer[0].output.dropout.p == 0.1  # hidden dropout kept
    gpt2 = build_model(load_train_config(None, base + ["model.attention_dropout=0", "model.task=causal-lm",
                                                      "model.config_overrides={model_type: gpt2, n_layer: 1, "
                                                      "n_embd: 32, n_head: 2}"]), Task.CAUSAL_LM, tok)
    assert gpt2.config.attn_pdrop == 0.0 and gpt2.config.resid_pdrop == 0.1
    gpt2_auto = build_model(load_train_config(None, base + ["model.task=causal-lm", "model.config_overrides="
                                                           "{model_type: gpt2, n_layer: 1, n_embd: 32, n_head: 2}"]),
                            Task.CAUSAL_LM, tok)
    assert gpt2_auto.config.attn_pdrop == 0.0 and gpt2_auto.config.resid_pdrop == 0.1
    with pytest.raises(ConfigError, match="model.attention_dropout"):
        load_train_config(None, base + ["model.attention_dropout=1.5"])
