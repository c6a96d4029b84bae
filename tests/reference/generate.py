"""Write the stored reference tensors in tests/reference/ (run from the repo root).

    python tests/reference/generate.py            # every stage
    python tests/reference/generate.py clip unet  # some stages

Each stage's module tests/ref_<stage>.py defines `reference_tensors() -> dict[str, Tensor]`:
the tiny config's weights (keys prefixed "weights."), its inputs ("inputs.") and the
reference implementation's outputs ("outputs."), computed with diffusers / transformers.
This script writes them to tests/reference/<stage>_tiny.safetensors with the seed and the
library versions in the file's metadata, so the tests can compare against them without
diffusers or transformers installed. The metadata also records the CPU kernels and thread count
that computed the outputs: another CPU differs from them by a few fp32 ulps, which is why the
tests compare stored outputs at the fp32 noise floor and never bit-exactly.
"""
from __future__ import annotations

import importlib
import platform
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, for ref_<stage>

STAGES = ["clip", "unet", "vae", "samplers", "checkpoint"]
SEED = 0


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": str(torch.get_num_threads())}
    for name in ("diffusers", "transformers", "numpy"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            pass
    return out


def main(stages: list[str]) -> None:
    for stage in stages:
        mod = importlib.import_module(f"ref_{stage}")
        torch.manual_seed(SEED)
        tensors = {k: v.detach().contiguous().cpu() for k, v in mod.reference_tensors().items()}
        meta = {"stage": stage, "seed": str(SEED), **{f"version.{k}": v for k, v in versions().items()}}
        path = HERE / f"{stage}_tiny.safetensors"
        save_file(tensors, str(path), metadata=meta)
        size = path.stat().st_size
        print(f"wrote {path.relative_to(HERE.parent.parent)}: {len(tensors)} tensors, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main(sys.argv[1:] or STAGES)
