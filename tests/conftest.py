"""Shared test machinery: the three tiers and where a real checkpoint is found.

Tiers (markers, declared in pyproject.toml):
  (none)   tiny configs, milliseconds; always run.
  full     the full SD 1.x architecture with random weights; runs by default, deselect
           with `-m "not full"` for a quick loop.
  gpu      needs CUDA; skipped cleanly without it.
  weights  needs a real SD 1.x checkpoint: $LDM_CHECKPOINT, or the first
           *.safetensors / *.ckpt / diffusers folder in weights/; skipped without one.

Per-stage reference builders live in tests/ref_<stage>.py; their full-size builders are
cached with functools.lru_cache, so each full-size model is built once per test run
however many test modules use it.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.weights import find_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def find_real_checkpoint() -> Path | None:
    return find_checkpoint(ROOT / "weights", real_only=True)


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    ckpt = find_real_checkpoint()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
    skip_weights = pytest.mark.skip(
        reason="needs a real SD 1.x checkpoint: set LDM_CHECKPOINT or put one in weights/")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "weights" in item.keywords and ckpt is None:
            item.add_marker(skip_weights)


@pytest.fixture(scope="session")
def real_checkpoint() -> Path:
    ckpt = find_real_checkpoint()
    if ckpt is None:
        pytest.skip("no real SD 1.x checkpoint")
    return ckpt


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes on a shared 2-core machine: one thread ran a tiny UNet forward in 48 ms, two
    threads fighting other processes for the cores in 0.7-1.3 s. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
