"""The pipeline: prompt -> conditioning (tokens -> context, and a vector for some families) ->
denoising loop -> VAE decode -> PIL images.

    pipe = ldm.load("weights/v1-5-pruned-emaonly.safetensors")        # device=, dtype=
    pipe = ldm.load()                                                  # weights/, else ldm's shipped model
    images = pipe("a dog wearing a hat", steps=25, scheduler="euler", guidance=7.5, seed=0)
    result = pipe.generate("a dog wearing a hat", seed=0)            # .images, .latents, .x0_preds
    result = pipe.img2img("a dog wearing a hat", image, strength=0.6, seed=0)
    result = pipe.inpaint("a cat", image, mask, seed=0)               # white = repaint

Everything a step does is composed from the stages (ldm.tokenizer, ldm.clip, ldm.unet, ldm.vae)
and ldm.samplers.sample, which owns the loop. The stages are the family's (ldm.families: a mapping
stage name -> network, pipe.stages), and so is the conditioner (ldm.conditioning) that turns the
prompts and negative prompts into what the UNet takes. This file adds what sits around the loop:

1. Classifier-free guidance (Ho & Salimans 2022): eps = eps(x, "") + s (eps(x, prompt) - eps(x, ""))
   with the negative prompt in place of ""; at s = 1 the unconditional pass is skipped.
2. Seeds: one CPU generator per image (seed, seed + 1, ...), as diffusers takes a list of
   generators: the starting noise, the VAE posterior draws and the ancestral samplers' noise come
   from them in diffusers' order, so the same seed gives the same image on any device and the
   same image as diffusers' pipelines.
3. img2img: the image's latent noised to the level where `strength` of the schedule remains.
4. Inpainting, two ways. An SD 1.5 inpainting checkpoint (9-channel UNet) sees the mask and the
   masked image's latent as 5 extra input channels at every step. A plain SD 1.x checkpoint
   cannot: after every step the known region of x is replaced by the original latent noised to
   the next step's level (a sampler step hook), as diffusers does with a 4-channel UNet.
5. Precision: latents stay float32; the networks may run in fp16/bf16 (default on CUDA), with the
   VAE kept in float32 under fp16 (SD's VAE decoder overflows fp16 into black/NaN images). A
   non-finite latent or image raises NonFiniteError instead of producing a black picture.
6. Memory: images are decoded one at a time, in tiles when larger than 512x512 (tile=None).
7. Options: every keyword of generate / img2img / inpaint is a field of ldm.options.Options, checked
   in one place (ldm.options.check) before any work; the family record (ldm.families) supplies the
   tokenizer, the schedule, the prediction type (eps or v, which flows to the sampler) and the
   preview colours, and a diffusers folder's scheduler config its prediction type, timestep spacing
   and steps offset. ldm.load(..., prediction_type=) and the prediction_type= option override them.
8. Adapters and prompts: pipe.load_lora(path, weight) merges a LoRA (ldm.lora; pipe.unload_loras()
   restores the weights bit for bit), pipe.load_embedding(path) adds a textual-inversion word
   (ldm.prompt); prompt_syntax="a1111" reads prompts as AUTOMATIC1111 does (weights, BREAK, no
   75-token limit) and clip_skip=N takes the N-th layer from the end. The PNG text records all four
   as A1111 writes them (<lora:name:weight> in the prompt, Lora hashes, TI hashes, Clip skip).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ldm import checkpoint, compiled, families, images as imgs, lora as lora_files, options as opts_mod
from ldm import prompt as prompt_syntaxes, samplers, weights
from ldm.conditioning import Conditioning
from ldm.families import Family
from ldm.memory import AUTO_TILE_LATENT, cpu_has_native_bf16, default_device_dtype, tune_allocator  # noqa: F401
from ldm.options import PROMPT_SYNTAXES, Options
from ldm.samplers.common import check_prediction_type, randn
from ldm.schedule import Schedule

__all__ = ["load", "Pipeline", "Result", "Options", "LoadedLoRA", "NonFiniteError", "default_device_dtype",
           "cpu_has_native_bf16", "PROMPT_SYNTAXES"]

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A latent or an image holds NaN or inf (typically fp16 overflow): refused rather than saved black."""


def check_finite(x: torch.Tensor, what: str, computed_in: torch.dtype | None = None,
                 loras: list[str] = ()) -> torch.Tensor:
    """x unchanged, or NonFiniteError saying how many values of `what` are NaN/inf and the likely
    cause, which depends on the precision the network that made x ran in (`computed_in`) and on the
    LoRAs merged into it (`loras`, their names: the first suspects, since a checkpoint loads checked)."""
    bad = ~torch.isfinite(x)
    if bad.any():
        computed_in = computed_in or x.dtype
        if computed_in in (torch.float16, torch.bfloat16):
            cause = (f"computed in {computed_in}: half-precision overflow; run in float32 (dtype=torch.float32, "
                     f"or --dtype fp32), or keep the VAE in float32 (vae_dtype=torch.float32)")
        elif loras:
            cause = (f"computed in {computed_in}, so not a half-precision overflow: the LoRAs loaded "
                     f"({', '.join(repr(name[:60]) for name in loras[:3])}) may push the weights out of range "
                     f"(retry without them or at a lower weight), or the sampler settings diverged")
        else:
            cause = (f"computed in {computed_in}, so not a half-precision overflow: the checkpoint's weights "
                     f"may hold NaN/inf (check the file), or the sampler settings diverged")
        raise NonFiniteError(f"{what} has {int(bad.sum())} NaN/inf values of {x.numel()}: nothing was saved; {cause}")
    return x


@dataclasses.dataclass
class Result:
    """What a generation returns. `latents` and `x0_preds` are float32 UNet-space (scaled) latents."""

    images: list[Image.Image]
    latents: torch.Tensor                  # (B, C, h, w) the final latent (C = 4 for SD)
    x0_preds: list[torch.Tensor]           # per step: (B, C, h, w) the step's x0 estimate
    previews: list[list[Image.Image]]      # per step, per image (empty unless previews= was set)
    seeds: list[int]                       # per image
    parameters: list[str]                  # per image: the PNG "parameters" text


def _prompt_list(prompt, name: str = "prompt") -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name}={prompt!r} must be a str or a non-empty list of str")
    return prompts


@dataclasses.dataclass
class LoadedLoRA:
    """A LoRA on a pipeline: its name (the file's stem, as in A1111's <lora:name:weight>), weight,
    A1111 short hash, and the ldm.lora handle that takes it off again."""

    name: str
    weight: float
    hash: str | None
    handle: lora_files.Applied


class Pipeline:
    """The family's networks + their tokenizers + schedule, on one device. Build it with ldm.load.

    models: stage -> network, every stage the family lists (ldm.families; SD: text_encoder, unet, vae),
    reachable as pipe.unet, pipe.vae, pipe.text_encoder (pipe.text_encoder_2, ... for a family that has
    one). tokenizers: text stage -> tokenizer (default: the family's; pipe.tokenizer is the first).
    family: its record in ldm.families (or the name of one); its conditioner turns prompts into what the
    UNet takes. prediction_type: what the UNet predicts (default: the family's). spacing: the default
    timestep spacing of every sampler (default None: each sampler's own; a diffusers folder's scheduler
    config may set it).
    """

    def __init__(self, models: Mapping[str, nn.Module], schedule: Schedule | None = None, name: str = "",
                 family: str | Family = "sd1", prediction_type: str | None = None, spacing: str | None = None,
                 tokenizers: Mapping[str, object] | None = None):
        self.family = families.get(family)
        if set(models) != set(self.family.stage_names):
            raise ValueError(f"models for {sorted(models)}; the {self.family.name} family's stages are "
                             f"{list(self.family.stage_names)}")
        self.stages = {name_: models[name_] for name_ in self.family.stage_names}
        self.tokenizers = dict(tokenizers) if tokenizers is not None else self.family.tokenizers()
        self.conditioner = self.family.conditioner()
        self.schedule = schedule or self.family.schedule()
        self.name = name
        self.prediction_type = check_prediction_type(prediction_type or self.family.prediction_type)
        self.spacing = spacing if spacing is not None else self.family.spacing  # the family's published default
        self.loras: list[LoadedLoRA] = []  # in the order loaded; unload_loras() takes them all off
        self.embeddings: list[prompt_syntaxes.Embedding] = []

    def __getattr__(self, name: str):
        """pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2: the network of that stage."""
        stages = self.__dict__.get("stages")
        if stages is not None and name in stages:
            return stages[name]
        raise AttributeError(f"{type(self).__name__!r} has no attribute or stage {name!r}")

    @property
    def tokenizer(self):
        """The first text stage's tokenizer (SD 1.x / 2.x: their one)."""
        return next(iter(self.tokenizers.values()))

    def __repr__(self) -> str:
        return (f"Pipeline({self.name!r}, family={self.family.name}, predicts {self.prediction_type}, "
                f"device={self.device}, unet {self.dtype}, vae {self.vae_dtype}, "
                f"unet in_channels={self.unet.cfg.in_channels})")

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the UNet denoises: the VAE's embed_dim (4 for SD)."""
        return self.vae.cfg.embed_dim

    @property
    def is_inpainting(self) -> bool:
        """True for an inpainting UNet (SD 1.5 inpainting): it takes the latent, the mask and the
        masked image's latent, 4 + 1 + 4 = 9 input channels."""
        return self.unet.cfg.in_channels == 2 * self.latent_channels + 1

    @property
    def min_size(self) -> int:
        """The smallest image side: one latent pixel at the UNet's deepest level (64 px for SD 1.x)."""
        return self.vae.cfg.downsample_factor * 2 ** (len(self.unet.cfg.channel_mult) - 1)

    @property
    def default_size(self) -> int:
        """The image side the model was trained at: the UNet's sample_size latents times the VAE's
        factor (512 for SD 1.x, 64 for ldm's shipped shapes model)."""
        return self.unet.cfg.sample_size * self.vae.cfg.downsample_factor

    def check_prediction_type(self, prediction_type: str | None) -> str:
        """The prediction type a run uses: this pipeline's, or an override the family allows (or the one
        the file itself stated); a one-line ValueError naming the allowed values otherwise."""
        if prediction_type is None or prediction_type == self.prediction_type:
            return self.prediction_type
        return self.family.check_prediction_type(prediction_type)

    # ---- adapters ---------------------------------------------------------------------------
    def load_lora(self, path, weight: float = 1.0, *, merge: bool = True, strict: bool = True) -> LoadedLoRA:
        """Apply a LoRA file (or an ldm.lora.LoRA) to the networks it adapts (UNet, text encoders) at `weight`.

        merge=True adds weight * alpha / r * up @ down into the weights (no cost per step);
        merge=False adds it in forward hooks (refused for an OpenCLIP tower's q/k/v, rows of a fused
        projection: SD 2.x's, SDXL's bigG). strict=False skips keys that match no module.
        Everything is checked before a weight changes: a refused file leaves the pipeline as it was.
        """
        lo = path if isinstance(path, lora_files.LoRA) else lora_files.read(path)
        handle = lora_files.apply(self.stages, [(lo, weight)], merge=merge, strict=strict)
        source = Path(lo.path)
        loaded = LoadedLoRA(source.stem, float(weight), imgs.short_hash(source, addnet=True) if source.is_file() else None, handle)
        self.loras.append(loaded)
        return loaded

    def unload_loras(self) -> None:
        """Take every loaded LoRA off, newest first: the original weight tensors come back."""
        while self.loras:
            self.loras.pop().handle.unmerge()

    def load_embedding(self, path, name: str | None = None) -> prompt_syntaxes.Embedding:
        """Add a textual-inversion embedding as the prompt word `name` (default: from the file)."""
        if len(self.tokenizers) > 1:
            raise ValueError(f"load_embedding: the {self.family.name} family has {len(self.tokenizers)} text towers "
                             f"({', '.join(self.tokenizers)}); ldm loads textual-inversion embeddings for one-tower "
                             f"families (SD 1.x, 2.x) only")
        emb = prompt_syntaxes.load_embedding(path, self.tokenizer, self.text_encoder, name=name)
        self.embeddings.append(emb)
        return emb

    # ---- the stages -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], *, clip_skip: int = 1, prompt_syntax: str = "plain") -> torch.Tensor:
        """prompts -> context in the UNet's dtype: (B, 77, C) on the plain path (a long prompt warns with
        what is dropped); (B, 77 n, C) with prompt_syntax="a1111", n = the most 75-token chunks a prompt
        needs (ldm.prompt.encode). clip_skip counts as A1111's: 1 = the last layer, 2 = the one before."""
        opts_mod.check_prompt_options(clip_skip, prompt_syntax, self.text_encoder.config.num_hidden_layers)
        if prompt_syntax == "a1111":
            return prompt_syntaxes.encode(prompts, self.tokenizer, self.text_encoder, clip_skip=clip_skip).to(self.dtype)
        ids = self.tokenizer(prompts).to(self.device)  # (B, 77)
        return self.text_encoder(ids, clip_skip=clip_skip - 1).to(self.dtype)  # (B, 77, C)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> (len(generators), C, H/f, W/f) float32 latents (SD: C = 4, f = 8),
        one posterior draw per generator, times the VAE's scaling factor (diffusers' retrieve_latents,
        sample mode)."""
        posterior = self.vae.encode(image.to(self.device, self.vae_dtype))
        z = torch.cat([posterior.sample(g) for g in generators])  # (B, C, h, w)
        return (z * self.vae.cfg.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: bool | None = None) -> torch.Tensor:
        """(B, C, h, w) scaled latents -> (B, 3, H, W) float32 images in [-1, 1], one image at a time.

        tile=None tiles above AUTO_TILE_LATENT latents a side (512 pixels); NaN/inf raise NonFiniteError.
        """
        check_finite(latents, "the latent", self.dtype, [lo.name for lo in self.loras])
        out = []
        for b, z in enumerate(latents.split(1)):  # one at a time: peak memory of one decode
            z = (z / self.vae.cfg.scaling_factor).to(self.device, self.vae_dtype)  # (1, C, h, w), unscaled
            big = max(z.shape[-2:]) > AUTO_TILE_LATENT
            if tile or (tile is None and big):
                x = self.vae.decode_tiled(z, tile_size=AUTO_TILE_LATENT, overlap=AUTO_TILE_LATENT // 4)
            else:
                x = self.vae.decode(z)
            out.append(check_finite(x, f"decoded image {b}", self.vae_dtype).float())
        return torch.cat(out)  # (B, 3, H, W)

    @torch.no_grad()
    def condition(self, prompts: list[str | None], **kwargs) -> Conditioning:
        """prompts (None: no text, a missing negative prompt) -> what the UNet is conditioned on, by the
        family's conditioner (ldm.conditioning): SD 1.x / 2.x a context (B, 77, C); SDXL a (B, 77, 2048)
        context and y (B, 2816). kwargs: the Options it reads (clip_skip, prompt_syntax; SDXL's sizes)."""
        o = Options.from_kwargs(kwargs)
        o = dataclasses.replace(o, height=o.height or self.default_size, width=o.width or self.default_size)
        opts_mod.check_prompt_options(o.clip_skip, o.prompt_syntax, self.text_encoder.config.num_hidden_layers)
        opts_mod.check_size_conditioning(o, self)
        return self.conditioner(self, list(prompts), o).to(self.dtype)

    def eps_fn(self, cond: Conditioning | torch.Tensor, guidance: float, extra: torch.Tensor | None = None):
        """The network as the samplers call it: eps_fn(x, t) -> the guided output, float32: eps, or v for a
        v-prediction model (guidance is linear, so it combines either the same way; the sampler converts).

        cond: a Conditioning (or a bare context tensor), 2B rows [uncond; cond] when guiding, B otherwise:
        context (., 77, C) and, for a family with a vector, y. extra: an inpainting UNet's (B, 1 + C, h, w)
        mask + masked-image latent, appended to x's channels (never scaled).
        """
        guided = guidance != 1.0
        cond = cond if isinstance(cond, Conditioning) else Conditioning(cond)

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in = torch.cat([x, x]) if guided else x  # (2B or B, C, h, w)
            if extra is not None:
                x_in = torch.cat([x_in, torch.cat([extra, extra]) if guided else extra], dim=1)  # 2C + 1 channels
            out = self.unet(x_in.to(self.dtype), t, cond.context, cond.y).float()
            if not guided:
                return out
            eps_uncond, eps_cond = out.chunk(2)
            return eps_uncond + guidance * (eps_cond - eps_uncond)  # classifier-free guidance

        return eps

    # ---- generation -------------------------------------------------------------------------
    # The keywords of generate / img2img / inpaint / __call__ are the fields of ldm.options.Options
    # (steps, scheduler, guidance, seed, negative_prompt, num_images, spacing, karras, eta,
    # prediction_type, clip_skip, prompt_syntax, previews, tile, progress, callback).
    def __call__(self, prompt, **kwargs) -> list[Image.Image]:
        """The images of generate(prompt, **kwargs)."""
        return self.generate(prompt, **kwargs).images

    def generate(self, prompt, *, height: int | None = None, width: int | None = None, **kwargs) -> Result:
        """Text to image. height/width default to default_size; other keywords: ldm.options.Options."""
        opts = Options.from_kwargs(kwargs, height=self.default_size if height is None else height,
                                   width=self.default_size if width is None else width)
        if self.is_inpainting:
            raise ValueError("this is an inpainting checkpoint (9-channel UNet): use pipe.inpaint(prompt, "
                             "image, mask) or `ldm inpaint`, or load a plain SD 1.x checkpoint")
        return self._run(prompt, "txt2img", opts)

    def img2img(self, prompt, image: Image.Image, *, strength: float = 0.75, height: int | None = None,
                width: int | None = None, **kwargs) -> Result:
        """Image to image: `strength` 1 redraws from (almost) pure noise, 0 returns the image as the VAE sees it."""
        if self.is_inpainting:
            raise ValueError("img2img needs a plain SD 1.x checkpoint, not an inpainting one (9-channel UNet)")
        x = imgs.from_pil(image, height, width, multiple=self.vae.cfg.downsample_factor)  # (1, 3, H, W)
        opts = Options.from_kwargs(kwargs, strength=strength, height=x.shape[2], width=x.shape[3])
        return self._run(prompt, "img2img", opts, image=x)

    def inpaint(self, prompt, image: Image.Image, mask: Image.Image, *, strength: float = 1.0,
                height: int | None = None, width: int | None = None, **kwargs) -> Result:
        """Repaint the white part of `mask` (same size as image); keep the black part."""
        f = self.vae.cfg.downsample_factor
        x = imgs.from_pil(image, height, width, multiple=f)  # (1, 3, H, W)
        opts = Options.from_kwargs(kwargs, strength=strength, height=x.shape[2], width=x.shape[3])
        m = imgs.mask_from_pil(mask, image.size, height, width, multiple=f)  # (1, 1, H, W)
        return self._run(prompt, "inpaint", opts, image=x, mask=m)

    @torch.no_grad()
    def _run(self, prompt, mode: str, opts: Options, image: torch.Tensor | None = None,
             mask: torch.Tensor | None = None) -> Result:
        """The shared loop: check the options (ldm.options.check), encode the prompts, draw the noise,
        run the sampler with the pipeline's prediction type, decode. image (1, 3, H, W) in [-1, 1] and
        mask (1, 1, H, W) in {0, 1} for img2img / inpaint."""
        prompts = _prompt_list(prompt)
        o = opts_mod.check(opts, self, mode, len(prompts))  # every option checked, defaults filled in
        negatives = (list(o.negative_prompt) if isinstance(o.negative_prompt, (list, tuple))
                     else [o.negative_prompt] * len(prompts))  # None: no negative prompt (ldm.conditioning)
        if o.guidance == 1.0 and any(negatives):
            log.warning("guidance=1 runs no unconditional pass, so the negative prompt has no effect "
                        "(guidance > 1 uses it)")
        B = len(prompts) * o.num_images
        seeds = self._seeds(o.seed, B)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]  # one per image, on the CPU
        f, C = self.vae.cfg.downsample_factor, self.latent_channels  # SD: 8 pixels per latent, 4 channels
        h, w = o.height // f, o.width // f

        # 1. text -> conditioning (the family's conditioner: a context (B, 77, C), and a vector y for some
        #    families), prompt b repeated num_images times; (2B, ...) [uncond; cond] when guiding
        #    (77 n tokens with prompt_syntax="a1111": prompts and negatives encoded together, so that
        #    both have the same number of chunks)
        texts = prompts + negatives if o.guidance != 1.0 else prompts
        encoded = self.conditioner(self, texts, o).to(self.dtype)
        cond = encoded[:len(prompts)].repeat_interleave(o.num_images)
        if o.guidance != 1.0:
            cond = Conditioning.cat([encoded[len(prompts):].repeat_interleave(o.num_images), cond])

        # 2. the image's latents and the starting noise, drawn from the generators in diffusers' order
        init, extra, hook = None, None, None
        if mode == "img2img":
            init = self.encode_image(image, generators)  # (B, C, h, w): one posterior draw per image
        elif mode == "inpaint" and (not self.is_inpainting or o.strength < 1.0):
            init = self.encode_image(image, generators[:1]).expand(B, -1, -1, -1)  # diffusers: generator 0
        noise = randn((B, C, h, w), generators, torch.float32, self.device)  # N(0, I)
        if mode == "inpaint":
            mask_lat = torch.nn.functional.interpolate(mask, size=(h, w)).to(self.device)  # (1, 1, h, w) nearest
            if self.is_inpainting:  # mask + latent of the image with the repainted part blacked out
                masked = self.encode_image(image * (mask < 0.5), generators[:1])  # (1, C, h, w)
                extra = torch.cat([mask_lat, masked], dim=1).expand(B, -1, -1, -1).to(self.dtype)
            else:  # a plain UNet: paste the known region back after every step, noised to the next level
                torch.randn((1, C, h, w), generator=generators[0], dtype=self.vae_dtype)  # diffusers encodes the
                # masked image here too (unused with a plain UNet): draw its numbers to stay in step with it
                hook = self._blend_hook(o, init, noise, mask_lat)
            if o.strength == 1.0:
                init = None  # start from pure noise (diffusers' inpainting does, unlike its img2img)

        # 3. the denoising loop (ldm.samplers), with the callback, previews and a progress bar
        start = samplers.img2img_start_step(o.steps, o.strength) if init is not None else 0
        x0_preds, previews_out = [], []
        bar = tqdm(total=o.steps - start, disable=not o.progress, desc=mode, unit="step")

        def on_step(i, x, x0_pred):
            x0_preds.append(x0_pred.float())
            if o.previews == "cheap":
                previews_out.append(imgs.to_pil(imgs.latent_preview(x0_pred, self.family.preview_factors())))
            elif o.previews == "vae":
                previews_out.append(imgs.to_pil(self.decode(x0_pred, o.tile)))
            if o.callback is not None:
                o.callback(i, x, x0_pred)
            bar.update()

        try:
            latents = samplers.sample(
                o.scheduler, self.eps_fn(cond, o.guidance, extra), noise, o.steps, self.schedule,
                generator=generators, callback=on_step, spacing=o.spacing, karras=o.karras, eta=o.eta,
                prediction_type=o.prediction_type, init=init, strength=o.strength if init is not None else 1.0,
                step_hook=hook)
        finally:
            bar.close()
        check_finite(latents, "the final latent", self.dtype, [lo.name for lo in self.loras])

        # 4. decode, and the PNG text of each image
        pil = imgs.to_pil(self.decode(latents, o.tile))
        params = [imgs.parameters_text(
            prompts[b // o.num_images] + "".join(f" <lora:{lo.name}:{lo.weight:g}>" for lo in self.loras),
            negatives[b // o.num_images] or "", steps=o.steps, sampler=o.scheduler,
            cfg_scale=o.guidance, seed=seeds[b], size=f"{o.width}x{o.height}", model=self.name or None,
            denoising_strength=o.strength if mode != "txt2img" else None,
            clip_skip=o.clip_skip if o.clip_skip != 1 else None,
            lora_hashes=imgs.a1111_hashes((lo.name, lo.hash) for lo in self.loras),
            ti_hashes=imgs.a1111_hashes((e.name, imgs.short_hash(e.path)) for e in self.embeddings
                              if imgs.uses_word(e.name, prompts[b // o.num_images], negatives[b // o.num_images] or "")),
            prompt_syntax=o.prompt_syntax if o.prompt_syntax != "plain" else None, mode=mode) for b in range(B)]
        return Result(pil, latents, x0_preds, previews_out, seeds, params)

    def _seeds(self, seed, B: int) -> list[int]:
        """One seed per image (seed was checked by ldm.options.check): seed + b, the list, or random."""
        if seed is None:
            seed = int(torch.randint(0, 2**31 - B, ()))
        if isinstance(seed, (list, tuple)):
            return list(seed)
        return [seed + b for b in range(B)]

    def _blend_hook(self, o: Options, init, noise, mask_lat):
        """Plain-SD inpainting: after step i, x = mask * x + (1 - mask) * (init noised to step i + 1)."""
        t, sigmas = samplers.sampler_grid(o.scheduler, self.schedule, o.steps, o.spacing, o.karras)

        def hook(i: int, x: torch.Tensor) -> torch.Tensor:
            known = samplers.noised_latent(o.scheduler, init, noise, i + 1, t, sigmas, self.schedule)
            return (1 - mask_lat) * known + mask_lat * x

        return hook


def load(path: str | Path | None = None, device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None, vae_dtype: torch.dtype | None = None,
         attention_backend: str = "auto", prediction_type: str | None = None, compile: bool = False) -> Pipeline:
    """A Pipeline from a single file (.safetensors / .ckpt) or a diffusers folder of a supported family.

    path: default ldm.weights.default_checkpoint(): a real checkpoint ($LDM_CHECKPOINT, weights/)
    if there is one, else the small shapes model ldm ships (the log says which, in one line).

    device: default CUDA if available, else CPU. dtype: default fp16 on CUDA, fp32 on the CPU; "auto":
    fp16 on CUDA, bf16 on a CPU with native bf16 (AVX512-BF16, AMX), else fp32 (ldm.memory).
    vae_dtype: default float32 when dtype is fp16 (the SD VAE overflows fp16), else dtype.
    attention_backend: the UNet's ("auto", "math", "sdpa", "triton"; see ldm.attention). compile: run the
    UNet through torch.compile (ldm.compiled: faster steps after a first call that compiles for minutes).
    prediction_type: what the UNet predicts, default the file's (a diffusers folder's scheduler config)
    or its family's (ldm.families); an override must be one the family allows.

    The family record also gives the tokenizer and the schedule; a diffusers folder's scheduler config sets
    the schedule's steps_offset and the default timestep spacing (generate's spacing= overrides it).
    """
    compiled.check_flag(compile, "ldm.load: compile")  # before any reading: a mistyped flag fails at once
    if path is None:
        path, why = weights.default_checkpoint()
        log.warning("ldm.load: no checkpoint given; using %s", why)
    device, dtype = default_device_dtype(device, dtype)
    vae_dtype = vae_dtype if vae_dtype is not None else torch.float32 if dtype == torch.float16 else dtype
    # the caller's prediction_type is step 1 of the rule (ldm/checkpoint/prediction.py): read() checks it
    # against the family before any building, and never runs the UNet to guess what it was told
    ck = checkpoint.read(path, prediction_type=prediction_type)
    family = ck.record
    predicts = ck.prediction_type  # the caller's, else the file's (its folder's scheduler config), else the family's
    models = weights.build_stages(ck)  # on the CPU in the file's dtype, then cast once each: the VAE to vae_dtype
    models = {stage: m.to(device, vae_dtype if stage == "vae" else dtype) for stage, m in models.items()}
    models["unet"].attention_backend = attention_backend
    schedule = family.schedule()
    if "steps_offset" in ck.scheduler:
        schedule = dataclasses.replace(schedule, steps_offset=ck.scheduler["steps_offset"])
    pipe = Pipeline(models, schedule, name=Path(path).stem, family=family, prediction_type=predicts,
                    spacing=ck.scheduler.get("timestep_spacing"))
    log.info("loaded %s (%s, predicts %s) on %s: unet %s, vae %s", path, ck.family, pipe.prediction_type, device,
             dtype, vae_dtype)
    tune_allocator()  # from here on freed activations stay in malloc's heap for the next step (ldm.memory)
    if compile:
        compiled.compile_unet(pipe.unet)
    return pipe
