"""The inference core (sparktune.model.hf) and the causal-LM side of the one model artifact."""

import time

import numpy as np
import pytest
from evalkit import build_classifier, build_tiny_gpt2


def test_pip_requirements_drop_local_build_tags():
    from importlib.metadata import version

    from sparktune.model import hf

    reqs = hf.pip_requirements()
    assert f"torch=={version('torch').split('+')[0]}" in reqs
    assert not [r for r in reqs if "+" in r]


def test_pad_batch_and_pad_id_fallback(gpt2_tokenizer_path):
    from transformers import AutoTokenizer

    from sparktune.model import hf

    ids, mask = hf.pad_batch([[5, 6, 7], [8], []], pad=0, pad_to_multiple_of=4)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_path)
    assert tok.pad_token_id is None and hf.pad_id(tok) == tok.eos_token_id
    # One max-length rule: the configured length, the tokenizer's and the positions; smallest wins.
    assert hf.max_length(tok, {"n_positions": 128}) == 128
    assert hf.max_length(tok, {"n_positions": 128}, configured=64) == 64


def test_batched_padded_probabilities_equal_one_row_at_a_time(tmp_path, minilm_path):
    import torch

    from sparktune.model import hf

    core = hf.load(build_classifier(minilm_path, str(tmp_path / "clf")), bf16=False)  # fp32: compared at 1e-5
    texts = ["Great.", "A long and winding review of a film that never quite finds its feet.", "Bad!"]
    ids = hf.encode(core.tokenizer, texts, core.max_length)
    batched = hf.classify(core.model, ids, core.pad_id, batch_size=8)
    with torch.no_grad():
        alone = [torch.softmax(core.model(input_ids=torch.tensor([x])).logits, -1)[0].numpy() for x in ids]
    np.testing.assert_allclose(batched, np.stack(alone), atol=1e-5)

    token = hf.DEADLINE.set(time.monotonic() - 1)
    try:
        with pytest.raises(hf.DeadlineExceeded):
            hf.classify(core.model, ids, core.pad_id)
    finally:
        hf.DEADLINE.reset(token)


def test_causal_lm_artifact_generates_bounded_text_and_loss(tmp_path, gpt2_tokenizer_path):
    import mlflow
    import pandas as pd
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparktune.model import artifact

    hf_dir = build_tiny_gpt2(gpt2_tokenizer_path, str(tmp_path / "gpt2"))
    path = artifact.save_model(hf_dir, str(tmp_path / "lm_model"), "causal_lm", max_new_tokens=5)
    with open(f"{path}/MLmodel") as handle:
        assert yaml.safe_load(handle)["metadata"]["task"] == "causal-lm"
    model = mlflow.pyfunc.load_model(path)
    texts = ["Once upon a time there was", "The film"]
    out = model.predict(pd.DataFrame({"text": texts}), params={"max_new_tokens": 3})
    assert list(out.columns) == ["generated_text", "loss", "n_tokens"]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert all(len(tok(t)["input_ids"]) <= 3 for t in out["generated_text"])
    capped = model.predict(pd.DataFrame({"text": texts[:1]}), params={"max_new_tokens": 500})
    assert len(tok(capped["generated_text"][0])["input_ids"]) <= 5  # the model's own bound wins
    lm = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor([tok(texts[0])["input_ids"]])
    with torch.no_grad():
        expected = lm(input_ids=ids, labels=ids).loss.item()
    assert out["loss"][0] == pytest.approx(expected, rel=1e-4)
    assert out["n_tokens"][0] == ids.shape[1] - 1


def test_one_predict_per_task_from_texts_or_ids(tmp_path, minilm_path, gpt2_tokenizer_path):
    """``hf.predict`` is the one dispatch: texts and the same texts' ids give the same answer, the
    classifier's probabilities are ``classify``'s, and a decoder's rows per pass follow the one rule."""
    from sparktune.model import hf

    assert [hf.rows_per_pass(t, 32) for t in hf.TASKS] == [32, 16, 8]
    assert hf.rows_per_pass(hf.INSTRUCTION, 2) == 1
    texts = ["Great.", "A long and winding review of a film that never quite finds its feet.", None]
    clf = hf.load(build_classifier(minilm_path, str(tmp_path / "clf")))
    ids = hf.encode(clf.tokenizer, ["" if t is None else t for t in texts], clf.max_length)
    by_text = hf.predict(clf, texts)
    np.testing.assert_allclose(by_text.probabilities, hf.predict(clf, ids=ids).probabilities, atol=1e-6)
    np.testing.assert_allclose(by_text.probabilities, hf.classify(clf.model, ids, clf.pad_id), atol=1e-6)
    assert by_text.prediction.tolist() == by_text.probabilities.argmax(axis=1).tolist()
    assert by_text.loss_sum is None and by_text.generated is None
    with pytest.raises(ValueError, match="texts or ids"):
        hf.predict(clf, texts, ids=ids)

    lm = hf.load(build_tiny_gpt2(gpt2_tokenizer_path, str(tmp_path / "gpt2")))
    out = hf.predict(lm, texts[:2], max_new_tokens=2)
    again = hf.predict(lm, ids=hf.encode(lm.tokenizer, texts[:2], lm.max_length))
    np.testing.assert_allclose(out.loss_sum, again.loss_sum, rtol=1e-5)
    assert out.n_predicted.tolist() == [len(x) - 1 for x in hf.encode(lm.tokenizer, texts[:2], lm.max_length)]
    assert out.probabilities is None and len(out.generated) == 2 and again.generated is None


def test_load_time_options_reach_the_pyfunc_through_model_config(tmp_path, minilm_path):
    """bf16, torch threads and batch size are load-time options: ``load_model(uri, model_config=...)``
    hands them to the pyfunc (no environment variable involved), and serve refuses one that a
    model logged without them would silently drop."""
    import mlflow
    import pandas as pd
    import torch
    import yaml

    from sparktune.errors import SparktuneError
    from sparktune.model import artifact, hf
    from sparktune.serve import load_options

    path = artifact.save_model(build_classifier(minilm_path, str(tmp_path / "clf")), str(tmp_path / "m"),
                               "classification")
    threads = torch.get_num_threads()
    try:
        plain = mlflow.pyfunc.load_model(path).unwrap_python_model()
        assert plain.batch_size == 32 and plain.core.bf16 is hf.resolve_bf16(None)
        model = mlflow.pyfunc.load_model(path, model_config=load_options(path, {"bf16": "true", "torch_threads": 1,
                                                                                 "batch_size": 4}))
        inner = model.unwrap_python_model()
        assert inner.core.bf16 is True and next(inner.core.model.parameters()).dtype == torch.bfloat16
        assert inner.batch_size == 4 and torch.get_num_threads() == 1
        out = model.predict(pd.DataFrame({"text": ["a wonderful film", "dull"]}))
        assert out["label"].tolist() == [inner.labels[p] for p in out["prediction"]]
    finally:
        torch.set_num_threads(threads)
    assert load_options(path, {"bf16": None}) == {}

    # A model logged before these keys existed: MLflow would ignore the option with a warning only.
    with open(f"{path}/MLmodel") as handle:
        mlmodel = yaml.safe_load(handle)
    for key in ("bf16", "torch_threads", "batch_size"):
        del mlmodel["flavors"]["python_function"]["config"][key]
    with open(f"{path}/MLmodel", "w") as handle:
        yaml.safe_dump(mlmodel, handle)
    with pytest.raises(SparktuneError, match="no load-time bf16"):
        load_options(path, {"bf16": "true"})
