"""Reference builders for a whole SD 1.x checkpoint: a local diffusers config folder.

diffusers' single-file loader (`StableDiffusionPipeline.from_single_file`) wants the component
configs; by default it fetches them from the Hub. `write_config_folder` writes them locally for
any configs of ours (tiny or SD 1.x), tokenizer files included, so the loader runs offline:

    pipe = StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True)
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import json
from pathlib import Path

import ref_clip
import ref_unet
import ref_vae
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


def write_tokenizer_files(folder: Path) -> None:
    vocab, merges = clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))


def write_config_folder(folder: Path, configs: dict) -> Path:
    """A diffusers pipeline folder without weights, for `configs` = {"text_encoder": CLIPTextConfig,
    "unet": UNetConfig, "vae": VAEConfig} (ldm.weights.random_models gives them)."""
    folder = Path(folder)
    components = {
        "unet": {"_class_name": "UNet2DConditionModel",
                 **ref_unet.diffusers_unet_config(configs["unet"])},
        "vae": {"_class_name": "AutoencoderKL", **ref_vae.diffusers_vae_config(configs["vae"])},
        "text_encoder": {"architectures": ["CLIPTextModel"],
                         **ref_clip.hf_clip_config(configs["text_encoder"]).to_dict()},
        "scheduler": SCHEDULER_CONFIG,
    }
    for name, cfg in components.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        fname = "scheduler_config.json" if name == "scheduler" else "config.json"
        (folder / name / fname).write_text(json.dumps(cfg, default=list))
    write_tokenizer_files(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}))
    return folder


def load_with_diffusers(path: Path, configs: dict, config_folder: Path, **kwargs):
    """diffusers' own single-file loader, offline, on a checkpoint written by ldm.weights
    (kwargs go to from_single_file, e.g. torch_dtype)."""
    from diffusers import StableDiffusionPipeline

    write_config_folder(config_folder, configs)
    return StableDiffusionPipeline.from_single_file(
        str(path), config=str(config_folder), local_files_only=True,
        safety_checker=None, requires_safety_checker=False, **kwargs)
