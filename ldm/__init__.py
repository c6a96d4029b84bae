"""ldm: a from-scratch, readable Stable Diffusion 1.x.

Every stage is one file, readable top to bottom, and checked against the reference
implementation (diffusers / transformers) on the same weights.

    import ldm
    pipe = ldm.load("weights/v1-5-pruned-emaonly.safetensors")   # a Pipeline (ldm/pipeline.py)
    images = pipe("a dog wearing a hat", steps=25, seed=0)

`ldm.load` and `ldm.Pipeline` are imported on first use, and so is every stage module
(`ldm.checkpoint`, `ldm.unet`, ...), so `import ldm` stays cheap.
"""
import importlib

__version__ = "0.1.0"
__all__ = ["load", "Pipeline"]


def __getattr__(name: str):
    if name in ("load", "Pipeline"):
        return getattr(importlib.import_module("ldm.pipeline"), name)
    try:
        return importlib.import_module(f"ldm.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"ldm.{name}":
            raise
        raise AttributeError(f"module 'ldm' has no attribute {name!r}") from None
