"""Shared test machinery: the tiers and where a real checkpoint is found.

Tiers (markers, declared in pyproject.toml):
  (none)   tiny configs, milliseconds; always run.
  docs     the docs site: one `mkdocs build --strict` that executes every notebook once, and
           the headless-browser checks of what it shows; in the default run (`-m "not docs"`
           leaves it out for a quick loop).
  full     the full-size architectures with random weights (real shapes and key names), minutes:
           a tier of its own, left out of the default run so it stays well under 10 minutes on
           2 cores. `python -m pytest -m full` runs it alone, `--full` adds it to the default run;
           naming a test by its node id runs it whatever its tier. .ci/run runs both.
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


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="also run the full-size tier (tests marked full), which the default run leaves out")


def _runs_full_tier(config) -> bool:
    """The full tier runs when asked for: --full, a -m expression that names it (`-m full`), or a node id."""
    named = any("::" in str(arg) for arg in config.args)
    return config.getoption("--full") or "full" in (config.getoption("-m") or "") or named


def pytest_collection_modifyitems(config, items):
    if not _runs_full_tier(config):
        full = [item for item in items if item.get_closest_marker("full")]
        if full:
            config.hook.pytest_deselected(items=full)
            items[:] = [item for item in items if not item.get_closest_marker("full")]
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
