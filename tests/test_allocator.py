"""ldm.memory.tune_allocator: glibc malloc's thresholds, raised once per process where that is safe.

Each case runs in a fresh interpreter: the setting is process-wide and applied once.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = """
import ctypes, resource, sys
from ldm import memory
first = memory.tune_allocator()
assert memory.tune_allocator() is first  # once per process: the second call changes nothing
if first:  # a 64 MiB block, freed and taken again: served from the heap, not a fresh mmap each time
    buf = ctypes.create_string_buffer(64 * 2**20); del buf
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        buf = ctypes.create_string_buffer(64 * 2**20); del buf
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 5 * 16384 / 2, faults  # untuned: every pass faults its 16384 pages in again
print(first)
"""


def run(env: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LDM_TUNE_ALLOCATOR")} | env
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


@pytest.mark.skipif(not (sys.platform.startswith("linux") and glibc()), reason="glibc's malloc only")
def test_applied_on_glibc_and_blocks_are_reused():
    assert run({}) == "True"


def test_environment_choices_win():
    assert run({"LDM_TUNE_ALLOCATOR": "0"}) == "False"
    assert run({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}) == "False"
