"""Rewrite constraints.txt from the environment that just passed the suite (run it only then).

    python3 -m venv .venv-new && . .venv-new/bin/activate && pip install torch==2.13.0 \
        && pip install -e ".[test]" && python -m pytest && python tools/update_constraints.py

The README's test command installs the test extra with `-c constraints.txt`, so a fresh machine gets
the versions this run proved together. Each pin carries the Python it was proven on as a marker:
on another Python pip resolves the ranges of pyproject.toml freely. Commit the new file with the
suite's result and a word on what moved.
"""
from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# Versions proven together: the README's test command installs the test extra with these constraints
# (pip install -e ".[test]" -c constraints.txt), so a fresh machine gets the reference libraries
# (diffusers, transformers, peft, accelerate), the docs tools and their dependencies at versions
# the whole suite has passed with, whatever the registry serves that day. The library's own
# requirements (pyproject.toml) stay ranges. Written by tools/update_constraints.py after a green
# run in a fresh environment (its docstring says how); not edited by hand.
#
# Proven: {date}, Python {python}, {machine}, torch {torch}. The pins apply on Python {minor};
# on another Python pip resolves the ranges freely, unproven.
"""


def main() -> None:
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                            check=True, capture_output=True, text=True).stdout.splitlines()
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    pins = []
    for line in freeze:
        if not line or line.startswith("#") or "==" not in line or line.lower().startswith("ldm=="):
            continue
        name, version = line.split("==", 1)
        pins.append(f'{name}=={version.split("+")[0]} ; python_version == "{minor}"')  # 2.13.0+cpu -> 2.13.0
    import torch
    header = HEADER.format(date=datetime.date.today().isoformat(), python=platform.python_version(),
                           machine=platform.machine(), torch=torch.__version__, minor=minor)
    (ROOT / "constraints.txt").write_text(header + "\n".join(sorted(pins, key=str.lower)) + "\n")
    print(f"wrote constraints.txt: {len(pins)} pins for Python {minor}")


if __name__ == "__main__":
    main()
