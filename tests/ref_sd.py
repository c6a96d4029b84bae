"""Reference builders for a whole SD 1.x checkpoint: a local diffusers config folder.

diffusers' single-file loader (`StableDiffusionPipeline.from_single_file`) wants the component
configs; by default it fetches them from the Hub. `write_config_folder` writes them locally for
any configs of ours (tiny or SD 1.x), tokenizer files included, so the loader runs offline:

    pipe = StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True)
"""
from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import ref_clip
import ref_openclip
import ref_unet
import ref_vae
from ldm.openclip import OpenCLIPTextConfig
from ldm.tokenizer import DEFAULT_VOCAB_PATH, bytes_to_unicode

# The SD 1.x scheduler config diffusers ships with the v1-5 repository (PNDM, scaled_linear).
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary from our vendored BPE file, as transformers wants it: 256 byte chars,
    256 + '</w>', 48,894 merges, 2 specials = 49,408."""
    lines = gzip.open(DEFAULT_VOCAB_PATH, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + 48894]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """transformers' CLIPTokenizer files; SD 2.x's pad with "!" (id 0) where SD 1.x's pad with EOS."""
    vocab, merges = clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": pad_token, "unk_token": "<|endoftext|>"}))


def write_config_folder(folder: Path, configs: dict, prediction_type: str = "epsilon") -> Path:
    """A diffusers pipeline folder without weights, for `configs` = {"text_encoder": CLIPTextConfig
    or OpenCLIPTextConfig (SD 2.x: transformers' CLIPTextModel of the blocks that run), "unet":
    UNetConfig, "vae": VAEConfig} (ldm.weights.random_models gives them)."""
    folder = Path(folder)
    te = configs["text_encoder"]
    sd2 = isinstance(te, OpenCLIPTextConfig)
    text_config = (ref_openclip.hf_config(te) if sd2 else ref_clip.hf_clip_config(te)).to_dict()
    components = {
        "unet": {"_class_name": "UNet2DConditionModel",
                 **ref_unet.diffusers_unet_config(configs["unet"])},
        "vae": {"_class_name": "AutoencoderKL", **ref_vae.diffusers_vae_config(configs["vae"])},
        "text_encoder": {"architectures": ["CLIPTextModel"], **text_config},
        "scheduler": {**SCHEDULER_CONFIG, "prediction_type": prediction_type},
    }
    for name, cfg in components.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        fname = "scheduler_config.json" if name == "scheduler" else "config.json"
        (folder / name / fname).write_text(json.dumps(cfg, default=list))
    write_tokenizer_files(folder / "tokenizer", pad_token="!" if sd2 else "<|endoftext|>")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}))
    return folder


def load_with_diffusers(path: Path, configs: dict, config_folder: Path, prediction_type: str = "epsilon", **kwargs):
    """diffusers' own single-file loader, offline, on a checkpoint written by ldm.weights
    (kwargs go to from_single_file, e.g. torch_dtype)."""
    from diffusers import StableDiffusionPipeline

    write_config_folder(config_folder, configs, prediction_type)
    return StableDiffusionPipeline.from_single_file(
        str(path), config=str(config_folder), local_files_only=True,
        safety_checker=None, requires_safety_checker=False, **kwargs)


# ---- whole pipelines ---------------------------------------------------------------------------
PIPELINE_CLASSES = {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
                    "inpaint": "StableDiffusionInpaintPipeline"}


def as_pipeline(base, kind: str, scheduler: str, prediction_type: str = "epsilon"):
    """diffusers' pipeline class for `kind` on base's components, with the scheduler ldm calls `scheduler`."""
    import diffusers
    import ref_samplers

    pipe = getattr(diffusers, PIPELINE_CLASSES[kind])(**{**base.components, "safety_checker": None},
                                                       requires_safety_checker=False)
    pipe.scheduler = ref_samplers.make_scheduler(scheduler, prediction_type=prediction_type)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=1)
def full_pipeline():
    """(ldm Pipeline, diffusers StableDiffusionPipeline) on one set of full-size SD 1.x random weights
    (the per-stage pairs of ref_clip / ref_unet / ref_vae, which share their tensors), built once."""
    import tempfile

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer as HFTokenizer

    from ldm.pipeline import Pipeline

    te, hf_te = ref_clip.full_pair()
    unet, d_unet = ref_unet.full_pair()
    vae, d_vae = ref_vae.full_pair()
    folder = Path(tempfile.mkdtemp(prefix="ldm-tok-"))
    write_tokenizer_files(folder)
    base = StableDiffusionPipeline(vae=d_vae, text_encoder=hf_te, tokenizer=HFTokenizer.from_pretrained(folder),
                                   unet=d_unet, scheduler=as_pipeline_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return Pipeline({"text_encoder": te, "unet": unet, "vae": vae}, name="random-full"), base


def as_pipeline_scheduler():
    import ref_samplers

    return ref_samplers.make_scheduler("pndm")


def run_diffusers(pipe, prompts: list[str], seeds: list[int], *, negative: str = "", **kwargs):
    """(uint8 images (B, H, W, 3), [latents after each step]) from a diffusers pipeline, with one CPU
    generator per image seeded from `seeds`, as ldm's pipeline makes them."""
    import numpy as np
    import torch

    steps = []

    def record(_pipe, i, t, tensors):
        steps.append(tensors["latents"].clone())
        return {}

    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(prompt=prompts, negative_prompt=[negative] * len(prompts), generator=generators,
               callback_on_step_end=record, output_type="pil", **kwargs)
    return np.stack([np.asarray(im) for im in out.images]), steps


# ---- comparing a run of ours with diffusers' ------------------------------------------------------
def run_ours(pipe, method, prompts, seed, **kw):
    """(Result, [latent after each step]) from one of our pipeline's methods."""
    steps = []
    res = getattr(pipe, method)(prompts, seed=seed, progress=False,
                                callback=lambda i, x, x0: steps.append(x.clone()), **kw)
    return res, steps


def compare(ours_steps, ours_images, ref_images, ref_steps):
    """Every step's latent (fp32, rtol 1e-4, atol 1e-4 times the step's largest |x|) and the images
    as uint8 (at most 1/255 apart)."""
    import numpy as np
    import torch

    assert len(ours_steps) == len(ref_steps) > 0
    for i, (a, b) in enumerate(zip(ours_steps, ref_steps)):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=1e-4 * scale, rtol=1e-4, msg=lambda m: f"step {i}: {m}")
    ours = np.stack([np.asarray(im) for im in ours_images]).astype(int)
    assert ours.shape == ref_images.shape
    assert np.abs(ours - ref_images.astype(int)).max() <= 1
