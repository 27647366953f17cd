"""The rank-memory benchmark's quick mode runs end to end (no timing or memory assertions: figures vary)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rank_memory_bench_quick_mode(tmp_path):
    done = subprocess.run([sys.executable, "bench/bench_rank_memory.py", "--quick", "--work", str(tmp_path)],
                          check=False, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    small, large = report["results"]
    assert (small["rows"], large["rows"]) == (2500, 25000) and small["staged_by"] == "direct"
    assert large["peak_mb"] >= large["baseline_mb"] > 0 and "growth" in report
