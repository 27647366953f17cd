"""The GPU check script's CPU smoke mode runs train(cfg) under torchrun end to end, so it never rots."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from gpu_check import gpt2_flops_per_token, peak_flops  # noqa: E402 -- bench/ is put on sys.path just above


def test_flops_and_peaks():
    # GPT-2 small: 123.65M parameters without position embeddings (nanoGPT's count), T=1024.
    assert gpt2_flops_per_token(12, 768, 50257, 1024) == pytest.approx(6 * 123.65e6 + 12 * 12 * 768 * 1024, rel=1e-3)
    assert peak_flops("NVIDIA H200", None) == peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", None) == 756e12 and peak_flops("cpu", None) is None
    assert peak_flops("cpu", 2.0) == 2e12


def test_smoke_mode_trains_under_torchrun(tmp_path, gpt2_tokenizer_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--json", "--work", str(tmp_path),
                           "--tokenizer", gpt2_tokenizer_path, "--imdb", ""],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    (arm,) = report["results"]
    assert report["device"] == "cpu" and arm["arm"] == "eager" and arm["steps"] == 4
    assert arm["tokens"] == 4 * 2 * 64 and arm["tokens_per_s_overall"] > 0 and arm["tokens_per_s_steady"] > 0
    assert 0 < arm["last_loss"] < 20
