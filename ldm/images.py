"""Images in and out of the pipeline: PIL <-> tensors, masks, cheap latent previews, PNG files.

    x = images.from_pil(img)                  # PIL (W x H) -> (1, 3, H, W) in [-1, 1]
    m = images.mask_from_pil(mask, H, W)      # PIL -> (1, 1, H, W) in {0, 1}: 1 = repaint, 0 = keep
    pils = images.to_pil(decoded)             # (B, 3, H, W) in [-1, 1] -> list of PIL images
    rgb = images.latent_preview(x0_pred, pipe.family.preview_factors())   # (B, 4, h, w) -> (B, 3, h, w), no VAE
    path = images.save_png(img, "outputs/", parameters_text(...))   # never overwrites

The conversions follow diffusers' VaeImageProcessor (same rounding, same mask binarisation at
0.5, the same Lanczos resize), so images that go through ours and through diffusers' pipelines
give the same numbers. The PNG text chunk "parameters" is the one the widely used web UIs read
and write, in their layout: prompt, "Negative prompt: ...", then "Steps: .., Sampler: .., ...".
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

__all__ = ["from_pil", "mask_from_pil", "to_pil", "latent_preview", "preview_pil", "a1111_hashes", "uses_word",
           "parameters_text", "save_png"]

log = logging.getLogger(__name__)

def _check_image(image, name: str) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name} must be a PIL.Image.Image, got {type(image).__name__}")
    return image


def _resize(image: Image.Image, height: int | None, width: int | None, name: str, multiple: int) -> Image.Image:
    """Resize to (width, height) if given (Lanczos, as diffusers); else the size must be a multiple of
    `multiple` (the VAE's downsampling factor: 8 for SD)."""
    if height is None and width is None:
        w, h = image.size
        m = multiple
        if w % m or h % m:
            raise ValueError(f"{name} is {w}x{h} pixels; width and height must be multiples of {m} "
                             f"(pass height= and width= to resize it, e.g. {w // m * m}x{h // m * m})")
        return image
    if height is None or width is None:
        raise ValueError(f"give both height and width to resize {name}, or neither (got {height=}, {width=})")
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def from_pil(image: Image.Image, height: int | None = None, width: int | None = None,
             name: str = "image", multiple: int = 8) -> torch.Tensor:
    """PIL image -> float32 (1, 3, H, W) in [-1, 1], resized to height x width if given (else its
    sides must be multiples of `multiple`, the VAE's downsampling factor).

    Grey, palette and RGBA images are converted to RGB (the alpha channel is dropped, with a log
    line); other modes (e.g. CMYK, 16-bit "I;16") are refused, as their colours would be guessed.
    """
    image = _check_image(image, name)
    if image.mode != "RGB":
        if image.mode not in ("L", "P", "RGBA", "LA", "PA"):
            raise ValueError(f"{name} has mode {image.mode!r}; give an RGB image (or L, P, RGBA, "
                             f"which are converted): image.convert('RGB') if its colours are plain")
        if "A" in image.mode:
            log.info("%s: mode %s -> RGB, the alpha channel is ignored", name, image.mode)
        image = image.convert("RGB")
    image = _resize(image, height, width, name, multiple)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # (H, W, 3) in [0, 1]
    return (2.0 * x - 1.0).permute(2, 0, 1)[None].contiguous()  # (1, 3, H, W) in [-1, 1]


def mask_from_pil(mask: Image.Image, image_size: tuple[int, int], height: int | None = None,
                  width: int | None = None, name: str = "mask", multiple: int = 8) -> torch.Tensor:
    """PIL mask -> float32 (1, 1, H, W) in {0, 1}: white (>= 0.5) is repainted, black is kept.

    The mask must have the image's size `image_size` = (width, height) in pixels: a mismatch is
    an error, because a stretched mask would repaint the wrong place. If height and width are
    given, the mask is resized with the image (Lanczos), then binarised, as diffusers does.
    """
    mask = _check_image(mask, name)
    if mask.size != tuple(image_size):
        raise ValueError(f"{name} is {mask.size[0]}x{mask.size[1]} pixels but the image is "
                         f"{image_size[0]}x{image_size[1]}; they must match")
    mask = _resize(mask, height, width, name, multiple)
    m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)  # (H, W) in [0, 1]
    return (m >= 0.5).float()[None, None]  # (1, 1, H, W)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B RGB PIL images; values outside [-1, 1] are clipped."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images has shape {tuple(images.shape)}; expected (B, 3, H, W)")
    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3) in [0, 1]
    return [Image.fromarray(a) for a in (x * 255).round().astype(np.uint8)]


def latent_preview(latents: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) scaled latent (e.g. a step's x0_pred) -> (B, 3, h, w) RGB in about [-1, 1].

    `factors` (C, 3) is the family's linear map (ldm.families: Family.preview_factors(), a published
    least-squares fit for SD's 4 channels). One C x 3 matrix per pixel: thousands of times cheaper
    than the VAE decoder, at the latent's resolution.
    """
    if latents.ndim != 4 or latents.shape[1] != factors.shape[0]:
        raise ValueError(f"latents has shape {tuple(latents.shape)}; expected (B, {factors.shape[0]}, h, w)")
    return torch.einsum("bchw,cr->brhw", latents.float(), factors.to(latents.device))


def preview_pil(latents: torch.Tensor, factors: torch.Tensor, scale: int = 1) -> list[Image.Image]:
    """latent_preview as PIL images, optionally enlarged `scale` times (nearest neighbour)."""
    images = to_pil(latent_preview(latents, factors))
    if scale > 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) for im in images]
    return images


def parameters_text(prompt: str, negative_prompt: str = "", **settings) -> str:
    """The PNG "parameters" text: prompt, negative prompt, then "Key: value" pairs on one line.

    parameters_text("a dog", "blurry", steps=25, sampler="euler", cfg_scale=7.5, seed=0, size="512x512")
    -> 'a dog\\nNegative prompt: blurry\\nSteps: 25, Sampler: euler, CFG scale: 7.5, Seed: 0, Size: 512x512'
    """
    names = {"cfg_scale": "CFG scale", "ti_hashes": "TI hashes"}
    pairs = ", ".join(f"{names.get(k, k.replace('_', ' ').capitalize())}: {v}"
                      for k, v in settings.items() if v is not None)
    lines = [prompt] + ([f"Negative prompt: {negative_prompt}"] if negative_prompt else []) + [pairs]
    return "\n".join(lines)


def short_hash(path: str | Path, *, addnet: bool = False) -> str:
    """A1111's short hash of a LoRA or embedding file, as its "Lora hashes" / "TI hashes" write it:
    the first 12 hex digits of a SHA-256 of the file; with addnet=True (A1111 does so for LoRA
    .safetensors files) over the bytes after the JSON header only (kohya's "addnet" hash, which
    editing the metadata does not change)."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if addnet and path.suffix == ".safetensors":
            header = int.from_bytes(f.read(8), "little")
            f.seek(8 + header)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def save_png(image: Image.Image, folder: str | Path, parameters: str, stem: str = "") -> Path:
    """Write image into folder as NNNNN[-stem].png, the next free number; never overwrites a file.

    The file is created with O_EXCL ("x" mode), so two processes writing to the same folder at
    once cannot take the same name either. `parameters` goes into the "parameters" text chunk.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)  # OSError (read-only place, a file in the way) is the caller's
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    numbers = [int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]*.png")]
    n = max(numbers, default=-1) + 1
    while True:
        path = folder / (f"{n:05d}-{stem}.png" if stem else f"{n:05d}.png")
        try:
            f = open(path, "xb")
        except FileExistsError:
            n += 1
            continue
        try:
            with f:
                image.save(f, format="PNG", pnginfo=info)
        except BaseException:
            path.unlink(missing_ok=True)  # our own half-written file, never someone else's
            raise
        return path


def a1111_hashes(pairs) -> str | None:
    """A1111's 'Lora hashes' / 'TI hashes' value: '"name: hash, name: hash"', or None for none."""
    text = ", ".join(f"{name}: {h}" for name, h in pairs if h)
    return f'"{text}"' if text else None


def uses_word(word: str, *texts: str) -> bool:
    """Does an embedding's word appear, as a word, in one of the texts (A1111 lists only those)?"""
    return any(re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", t, re.IGNORECASE) for t in texts)
