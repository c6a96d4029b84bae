"""Every stage of one generation, as the explorer's page draws it: a JSON-able dict per run.

    layers = cross_attention_layers(pipe)         # [{"name", "label", "size"}], one per attn2 layer
    out = run(pipe, request, layers)              # request: ldm.explore.request.Request

Nothing here re-implements a stage; each number comes from the library's own API:

1. tokens      pipe.tokenizer: the ids (BOS ... EOS) and each id's BPE piece (tokenizer.id_to_token)
               and its text (tokenizer.decode); what a long prompt loses past 75 tokens
               (tokenizer.truncated_text).
2. similarity  pipe.condition([prompt]).context: the text encoder's output rows, BOS to EOS, and
               their cosine similarity (n, n): which tokens the encoder made alike.
3. steps       pipe.generate(..., callback=): after step i the latent x and the step's x0 estimate.
               The latent is shown channel by channel (grey, scaled by its own std, which is printed:
               it falls from sigma_max to the data's spread as the noise goes). The x0 estimate is shown
               as an image: decoded by the VAE when the latent is at most X0_VAE_MAX a side (the shipped
               64x64 model: 20 decodes of an 8x8 latent cost less than the UNet's steps, and its VAE is
               not SD's, so SD's linear latent -> RGB fit would paint wrong colours), else by the
               family's cheap linear preview (ldm.images.latent_preview; a VAE decode per step at
               512x512 costs more than the step).
4. attention   pipe.unet.capture(attention=[layer]) around the generation (ldm.capture): inside the
               callback the capture holds that step's last UNet call, whose prompt half (the last B
               rows; the first B are the negative prompt's under guidance) gives each token's map,
               averaged over heads, and one more for the padding after EOS, summed: (B, n + 1, H, W);
               at each pixel the n + 1 maps sum to 1 (the softmax over the 77 keys).
5. images      Result.images, with Result.seeds and the PNG "parameters" text.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import time
import warnings

import torch
import torch.nn.functional as F
from PIL import Image

from ldm import images as imgs, samplers
from ldm.explore.request import Request

__all__ = ["cross_attention_layers", "default_layer", "run", "X0_VAE_MAX", "ATTENTION_MAX"]

X0_VAE_MAX = 16     # latents up to this side get x0 previews from the VAE (128x128 pixels for SD's VAE)
ATTENTION_MAX = 32  # attention maps larger than this a side are average-pooled down to it (SD's 64x64)


def png_url(image: Image.Image) -> str:
    """A PIL image as a data: URL (the page needs no second request, and nothing is written to disk)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@torch.no_grad()
def cross_attention_layers(pipe) -> list[dict]:
    """The UNet's cross-attention layers, each with a label and the (H, W) it attends over at the model's
    default size. The sizes come from one capture of every layer at the smallest image the UNet takes
    (cheap at any model size), scaled up: each level halves the map."""
    names = pipe.unet.attention_layers("cross")
    f, small = pipe.vae.cfg.downsample_factor, pipe.min_size // pipe.vae.cfg.downsample_factor
    cond = pipe.condition([""])  # (1, 77, C)
    x = torch.zeros(1, pipe.latent_channels, small, small, device=pipe.device, dtype=pipe.dtype)
    t = torch.tensor([999], device=pipe.device)
    with pipe.unet.capture(attention=names) as cap:
        pipe.unet(x, t, cond.context, cond.y)
    scale = pipe.default_size // f // small
    out = []
    for name in names:
        H, W = (s * scale for s in cap.sizes[name])
        where = name.split(".", 1)[0]
        part = {"input_blocks": "down", "middle_block": "mid", "output_blocks": "up"}.get(where, where)
        index = name.split(".")[1] if part != "mid" else ""
        out.append({"name": name, "label": f"{part} {index} · {H}×{W}".replace("  ", " "), "size": [H, W]})
    return out


def default_layer(layers: list[dict]) -> str:
    """The first up-path layer at the largest resolution up to 16x16 (SD: output_blocks.3, 16x16, whose
    maps prompt-to-prompt found the most telling; the shipped model: output_blocks.4, 8x8)."""
    up = [d for d in layers if d["name"].startswith("output_blocks") and max(d["size"]) <= 16] or layers
    best = max(max(d["size"]) for d in up)
    return next(d["name"] for d in up if max(d["size"]) == best)


def token_rows(tok, prompt: str) -> tuple[list[dict], str]:
    """BOS, the prompt's ids (at most 75), EOS: each {"id", "piece", "text"}; and the text dropped past 75."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a long prompt's TruncationWarning: reported as "dropped" instead
        ids = tok([prompt])[0].tolist()  # (77,)
        dropped = tok.truncated_text(prompt)
    n = next((i + 1 for i in range(1, len(ids)) if ids[i] == tok.eos_id), len(ids))  # to the first EOS
    special = {tok.bos_id: "<start>", tok.eos_id: "<end>"}
    return [{"id": i, "piece": tok.id_to_token[i], "text": special.get(i) or tok.decode([i])}
            for i in ids[:n]], dropped


def cosine_matrix(rows: torch.Tensor) -> torch.Tensor:
    """(n, C) -> (n, n) cosine similarity of every pair of rows."""
    unit = F.normalize(rows.float(), dim=-1)
    return unit @ unit.T


def latent_tiles(x: torch.Tensor) -> tuple[Image.Image, float]:
    """(C, h, w) latent -> its channels side by side in a grid (grey, 0.5 + x / (6 std): +-3 std spans
    black to white), one pixel of gap; and the std."""
    C, h, w = x.shape
    std = float(x.std()) or 1.0
    cols = int(C ** 0.5 + 0.999)
    rows = (C + cols - 1) // cols
    grid = torch.full((rows * (h + 1) - 1, cols * (w + 1) - 1), 0.5)
    for c in range(C):
        r, q = divmod(c, cols)
        grid[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = (0.5 + x[c] / (6 * std)).clamp(0, 1)
    pixels = (grid.nan_to_num(0.5) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels, mode="L"), std


@torch.no_grad()
def x0_images(pipe, x0: torch.Tensor) -> tuple[list[Image.Image], str]:
    """(N, C, h, w) scaled x0 estimates -> N PIL images, and how they were made ("vae" or "cheap")."""
    if max(x0.shape[-2:]) <= X0_VAE_MAX:
        z = (x0 / pipe.vae.cfg.scaling_factor).to(pipe.device, pipe.vae_dtype)  # unscaled, as the VAE takes it
        return imgs.to_pil(pipe.vae.decode(z).float().nan_to_num()), "vae"
    return imgs.to_pil(imgs.latent_preview(x0, pipe.family.preview_factors()).nan_to_num()), "cheap"


def _pool(maps: torch.Tensor) -> torch.Tensor:
    """(..., H, W) -> at most ATTENTION_MAX a side, by average pooling (a whole factor)."""
    k = -(-max(maps.shape[-2:]) // ATTENTION_MAX)
    if k <= 1:
        return maps
    lead = maps.shape[:-2]
    return F.avg_pool2d(maps.reshape(-1, 1, *maps.shape[-2:]), k, ceil_mode=True).reshape(*lead, *[
        -(-s // k) for s in maps.shape[-2:]])


def _rounded(t: torch.Tensor, places: int = 4) -> list:
    return (t * 10**places).round().div(10**places).tolist()


def run(pipe, req: Request, layers: list[dict]) -> dict:
    """One generation with every stage recorded; the dict the page draws (see the module docstring)."""
    start = time.perf_counter()
    tok = pipe.tokenizer
    tokens, dropped = token_rows(tok, req.prompt)
    n = len(tokens)
    B = req.num_images
    latents, maps = [], []
    with pipe.unet.capture(attention=[req.layer]) as cap, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the prompt was cut to 75 tokens: already reported as `dropped`
        context = pipe.condition([req.prompt]).context[0, :n]  # (n, C): the encoder's output rows, BOS .. EOS
        similarity = cosine_matrix(context)

        def on_step(i, x, x0_pred):
            latents.append(x.float().cpu().clone())  # (B, C, h, w)
            probs = cap.token_maps(req.layer)[-B:].float().mean(1)  # (B, 77, H, W), the prompt's half
            probs = torch.cat([probs[:, :n], probs[:, n:].sum(1, keepdim=True)], 1)  # + all the padding
            maps.append(_pool(probs).cpu())  # (B, n + 1, H, W)

        t0 = time.perf_counter()
        result = pipe.generate(req.prompt, steps=req.steps, scheduler=req.sampler, guidance=req.guidance,
                               seed=req.seed, negative_prompt=req.negative_prompt or None,  # empty box: none
                               num_images=B, progress=False, callback=on_step)
        generate_s = time.perf_counter() - t0

    x0_pil, x0_how = x0_images(pipe, torch.cat(result.x0_preds))  # steps * B images, step-major
    t, sigmas = samplers.sampler_grid(req.sampler, pipe.schedule, req.steps, pipe.spacing)
    steps = []
    for i, x in enumerate(latents):
        tiles = [latent_tiles(x[b]) for b in range(B)]
        steps.append({
            "t": round(float(t[i]), 2),
            "sigma": None if sigmas is None else round(float(sigmas[i + 1]), 4),  # the level x is now at
            "latent": [png_url(im) for im, _ in tiles],
            "latent_std": [round(s, 4) for _, s in tiles],
            "x0": [png_url(x0_pil[i * B + b]) for b in range(B)],
            "attention": [[_rounded(m) for m in maps[i][b]] for b in range(B)],  # (B, n + 1, H, W)
        })
    H, W = maps[0].shape[-2:] if maps else (0, 0)
    return {
        "tokens": tokens,
        "padding": tok.max_length - n,  # the ids after EOS (SD 1.x pads with EOS itself)
        "dropped": dropped,
        "similarity": _rounded(similarity, 3),
        "steps": steps,
        "x0_preview": x0_how,
        "attention": {"layer": req.layer, "size": [H, W],
                      "label": next((d["label"] for d in layers if d["name"] == req.layer), req.layer)},
        "images": [png_url(im) for im in result.images],
        "seeds": result.seeds,
        "parameters": result.parameters,
        "request": dataclasses.asdict(req),
        "timing": {"generate_s": round(generate_s, 3), "total_s": round(time.perf_counter() - start, 3)},
    }
