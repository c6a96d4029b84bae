"""Conditioning: how a family turns prompts into what its UNet takes.

    cond = pipe.condition(["a dog", None])     # SD 1.x: Conditioning(context (2, 77, 768), y None)
    cond = pipe.condition(["a dog"], height=1024, width=1024)   # SDXL: context (1, 77, 2048), y (1, 2816)
    eps = pipe.unet(x, t, cond.context, y=cond.y)

SD 1.x and 2.x condition on one thing: the text tower's output, a context of T = 77 (or 77 n) vectors
that the UNet's cross-attention reads. SDXL (Podell et al. 2023, sec. 2.1-2.2) adds a vector y that
the UNet adds to its timestep embedding through `label_emb`:

    context (B, 77, 2048) = cat[CLIP ViT-L's penultimate layer (768), OpenCLIP ViT-bigG's (1280)]
                            (hidden states, no final layer norm: sgm's "penultimate", diffusers' [-2])
    y       (B, 2816)     = cat[pooled (1280): bigG's ln_final(last layer) at EOT @ text_projection,
                                Fourier(256) of each of original_size (h, w), crops_coords_top_left
                                (top, left) and target_size (h, w): 6 x 256 = 1536]

The six size numbers are what SDXL was trained to be told about its data: the size a training
image had before it was resized (so small, upscaled images no longer teach the model blur), where
a random crop cut it (so crops no longer teach it to cut heads off), and the size it is asked for.
At inference they are knobs: original_size smaller than the target asks for the look of an upscaled
small image, a non-zero crop for an off-centre framing. The Fourier features are the UNet's own
timestep embedding (ldm.unet.timestep_embedding, cosines first), of the width the UNet's label_emb
leaves for them: (adm_in_channels - pooled width) / 6.

A prompt of None is "no text at all", as against "" (the empty prompt, which is encoded): SD 1.x and
2.x encode "" for it (diffusers does); SDXL's unconditional branch with no negative prompt is zeros,
context and pooled vector alike (diffusers' force_zeros_for_empty_prompt; the references disagree
here, DESIGN.md "SDXL": generative-models always zeroes, stable-diffusion.cpp only the context; ldm
follows diffusers, the parity reference). The size numbers are the same for every row.

A family's record names its conditioner (ldm.families.Family.conditioner); the pipeline asks it for
a Conditioning of the prompts and the negative prompts together, with the generation's options
(ldm.options.Options: clip_skip, prompt_syntax and the size numbers), so classifier-free guidance
works on whatever it returns: guidance stacks [uncond; cond] field by field (Conditioning.cat), and
the UNet gets each field.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["Conditioning", "TextContext", "TwoTowersAndSizes", "size_numbers"]


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
    syntax, CLIP skip, embeddings); its output is the context, and there is no vector. A prompt of
    None (no negative prompt) is encoded as "", as diffusers does for these families."""

    takes_sizes = False  # no size conditioning: options.check refuses original_size & co.

    def __call__(self, pipe, prompts: list[str | None], opts) -> Conditioning:
        texts = ["" if p is None else p for p in prompts]
        return Conditioning(pipe.encode_prompt(texts, clip_skip=opts.clip_skip, prompt_syntax=opts.prompt_syntax))


def size_numbers(opts) -> tuple[int, ...]:
    """SDXL's six numbers: original_size (h, w), crops_coords_top_left (top, left), target_size (h, w);
    the sizes default to the image's (opts.height, opts.width), the crop to (0, 0), as in diffusers."""
    image = (opts.height, opts.width)
    return (*(opts.original_size or image), *(opts.crops_coords_top_left or (0, 0)), *(opts.target_size or image))


class TwoTowersAndSizes:
    """SDXL: two text towers side by side for the context, the second one's pooled vector and the six
    size numbers for y (this module's docstring). Stages "text_encoder" (CLIP ViT-L, ldm.clip) and
    "text_encoder_2" (OpenCLIP ViT-bigG, ldm.openclip with final_norm_on_context=False), each with its
    tokenizer (the second pads with id 0). clip_skip counts as A1111's, from SDXL's default: 1 = the
    penultimate layer of each tower (diffusers' clip_skip=None), 2 = the one before (diffusers' 1)."""

    takes_sizes = True

    def __call__(self, pipe, prompts: list[str | None], opts) -> Conditioning:
        from ldm.unet import timestep_embedding  # the UNet's sinusoids serve the size numbers

        if opts.prompt_syntax != "plain":
            raise ValueError(f"prompt_syntax={opts.prompt_syntax!r}: ldm reads SDXL prompts as plain text only "
                             f"(the A1111 syntax is written for one text tower); use prompt_syntax='plain'")
        tower_1, tower_2 = pipe.text_encoder, pipe.text_encoder_2
        adm, pooled_width = pipe.unet.cfg.adm_in_channels, tower_2.config.embed_dim
        per_number, rest = divmod((adm or 0) - pooled_width, 6)  # checked before the towers run
        if adm is None or per_number < 2 or per_number % 2 or rest:
            raise ValueError(f"the UNet's adm_in_channels={adm} does not hold the pooled vector "
                             f"({pooled_width}) and six even-width size embeddings")
        rows = [i for i, p in enumerate(prompts) if p is not None]   # the rows that have text
        texts = [prompts[i] for i in rows]
        B, device = len(prompts), pipe.device
        width_1, width_2 = tower_1.config.hidden_size, tower_2.config.width
        context = torch.zeros(B, pipe.tokenizers["text_encoder"].max_length, width_1 + width_2, device=device)
        pooled = torch.zeros(B, pooled_width, device=device)
        if texts:
            ids_1 = pipe.tokenizers["text_encoder"](texts).to(device)           # (n, 77), padded with EOS
            ids_2 = pipe.tokenizers["text_encoder_2"](texts).to(device)         # (n, 77), padded with 0
            _, hidden = tower_1(ids_1, return_hidden_states=True)               # L + 1 states, no final LN
            context_1 = hidden[-1 - opts.clip_skip]                              # (n, 77, 768): [-2] by default
            context_2, pooled_2 = tower_2.encode(ids_2, clip_skip=opts.clip_skip - 1)  # (n, 77, 1280), (n, 1280)
            context[rows] = torch.cat([context_1.float(), context_2.float()], dim=-1)  # (n, 77, 2048)
            pooled[rows] = pooled_2.float()
        numbers = torch.tensor(size_numbers(opts), dtype=torch.float32, device=device)  # (6,)
        sizes = timestep_embedding(numbers, per_number).reshape(1, 6 * per_number)     # (1, 1536): 6 x 256
        y = torch.cat([pooled, sizes.expand(B, -1)], dim=-1)                             # (B, 2816)
        return Conditioning(context, y)
