"""No two sparktune modules import each other, not even through imports inside functions
(``ci/import_cycles.py``; the instruct <-> tokenize cycle was hidden that way)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_import_cycle_in_sparktune():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "ci", "import_cycles.py"), "--all"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "no import cycle (function-local imports included)"
