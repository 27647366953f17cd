"""LoRA through peft: only the adapters (and the new head) train, and the saved model is merged."""

import os

import pytest
from test_train_support import write_tokenized_table


@pytest.mark.timeout(300)
def test_lora_minilm_trains_adapters_and_saves_a_merged_model(tmp_path, minilm_path):
    import torch
    from safetensors.torch import load_file

    from sparktune.train.config import load_train_config
    from sparktune.train.train import train

    table = write_tokenized_table(tmp_path / "tok", minilm_path, n_train=24, n_test=8, max_length=48)
    cfg = load_train_config(data={
        "output_dir": str(tmp_path / "out"),
        "model": {"name": minilm_path, "task": "classification", "num_labels": 2},
        "data": {"table": str(table), "eval_split": ""},
        "train": {"batch_size": 4, "max_steps": 4, "learning_rate": 1e-2, "warmup_steps": 0},
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "checkpoint": {"strategy": "no"},
        "mlflow": {"enabled": False},
    })
    result = train(cfg)  # one process, no launcher: train() knows nothing about Spark

    assert result.global_step == 4
    saved = load_file(os.path.join(result.model_dir, "model.safetensors"))
    assert not any("lora" in key for key in saved), "adapters must be merged into the base weights"
    base = load_file(os.path.join(minilm_path, "model.safetensors"))

    def weight(state, suffix):
        return next(v for k, v in state.items() if k.endswith(suffix))

    query, key = "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.key.weight"
    # LoRA targets BERT's query/value: merged query weights moved, untargeted key weights did not.
    assert not torch.allclose(weight(saved, query), weight(base, query))
    assert torch.equal(weight(saved, key), weight(base, key))
