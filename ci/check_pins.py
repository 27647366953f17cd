"""Exit 1 unless every package pinned in a constraints file is installed at exactly its pin.

Run with the venv's own python: ``python ci/check_pins.py ci/constraints-dbr-17.3-lts-ml.txt``.
After `pip install <the sparktune wheel>` this is the proof that installing sparktune left the
runtime's libraries alone (what `%pip install sparktune` must do on a Databricks cluster).
"""

from __future__ import annotations

import importlib.metadata
import sys

from packaging.requirements import Requirement


def pins(path: str) -> dict:
    found = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if line:
                req = Requirement(line)
                [spec] = req.specifier
                if spec.operator != "==":
                    raise SystemExit(f"{path}: {line!r} is not an exact pin (==)")
                found[req.name] = spec.version
    return found


def main(path: str) -> int:
    wrong = []
    for name, version in pins(path).items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        if installed != version:
            wrong.append(f"{name}: pinned {version}, installed {installed}")
    if wrong:
        print(f"{path}: {len(wrong)} package(s) differ from their pins:\n  " + "\n  ".join(wrong), file=sys.stderr)
        return 1
    print(f"{path}: all {len(pins(path))} pins installed as pinned")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
