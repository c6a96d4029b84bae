"""ldm: a from-scratch, readable Stable Diffusion 1.x.

Every stage is one file, readable top to bottom, and checked against the reference
implementation (diffusers / transformers) on the same weights.
"""
__version__ = "0.1.0"
