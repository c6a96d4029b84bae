"""Conditioning: how a family turns prompts into what its UNet takes.

    cond = pipe.family.conditioner()(pipe, ["a dog", ""])     # Conditioning(context (2, 77, C), y None)
    eps = pipe.unet(x, t, cond.context, y=cond.y)

SD 1.x and 2.x condition on one thing: the text tower's output, a context of T = 77 (or 77 n) vectors
that the UNet's cross-attention reads. Other families add a vector y that the UNet adds to its
timestep embedding (SDXL: a pooled text embedding and the image's size numbers, through `label_emb`).
A family's record names its conditioner (ldm.families.Family.conditioner); the pipeline asks it for
a Conditioning of the prompts and the negative prompts together, so classifier-free guidance,
negative prompts, A1111 weights and chunks, CLIP skip and embeddings work on whatever it returns:
guidance stacks [uncond; cond] field by field (Conditioning.cat), and the UNet gets each field.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["Conditioning", "TextContext"]


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on, one row per image: context (B, T, C) for cross-attention,
    y (B, adm) for the UNet's label embedding, or None where the family has no vector."""

    context: Tensor
    y: Tensor | None = None

    def __len__(self) -> int:
        return self.context.shape[0]

    def __getitem__(self, rows) -> Conditioning:
        """The rows `rows` (a slice or index tensor) of every field."""
        return Conditioning(self.context[rows], None if self.y is None else self.y[rows])

    def repeat_interleave(self, n: int) -> Conditioning:
        """Each row n times in a row (num_images per prompt)."""
        return Conditioning(self.context.repeat_interleave(n, dim=0),
                            None if self.y is None else self.y.repeat_interleave(n, dim=0))

    def to(self, dtype: torch.dtype) -> Conditioning:
        return replace(self, context=self.context.to(dtype), y=None if self.y is None else self.y.to(dtype))

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Rows stacked, field by field: [uncond; cond] for classifier-free guidance."""
        ys = [p.y for p in parts]
        if any(y is None for y in ys) and not all(y is None for y in ys):
            raise ValueError("Conditioning.cat: some parts have a vector y and some do not")
        return Conditioning(torch.cat([p.context for p in parts]), None if ys[0] is None else torch.cat(ys))


class TextContext:
    """SD 1.x and 2.x: the prompts through the one text tower (pipe.encode_prompt: plain or A1111
    syntax, CLIP skip, embeddings); its output is the context, and there is no vector."""

    def __call__(self, pipe, prompts: list[str], *, clip_skip: int = 1, prompt_syntax: str = "plain") -> Conditioning:
        return Conditioning(pipe.encode_prompt(prompts, clip_skip=clip_skip, prompt_syntax=prompt_syntax))
