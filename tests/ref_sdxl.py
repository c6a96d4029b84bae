"""Reference builders for SDXL: a local diffusers config folder for StableDiffusionXLPipeline.

diffusers' single-file loader converts an SDXL single file (conditioner.embedders.0.transformer.* CLIP
ViT-L, conditioner.embedders.1.model.* OpenCLIP ViT-bigG, model.diffusion_model.*, first_stage_model.*)
with the component configs it is given; `write_config_folder` writes them for any configs of ours
(ldm.families' sdxl record, full or tiny), tokenizer files included, so it runs offline:

    pipe = StableDiffusionXLPipeline.from_single_file(path, config=folder, local_files_only=True)

The UNet is diffusers' SDXL UNet: addition_embed_type "text_time" (the pooled vector and the six size
numbers through add_time_proj, 256-wide sinusoids, into add_embedding: our label_emb), with the size
features as wide as our label_emb leaves for them. The scheduler is SDXL base's published config
(Euler, "leading" spacing, steps_offset 1).
"""
from __future__ import annotations

import json
from pathlib import Path

import ref_clip
import ref_openclip
import ref_unet
import ref_vae
from ref_sd import write_tokenizer_files

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "interpolation_type": "linear",
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the published one, not derived from ldm's config):
# attention_head_dim is diffusers' name for the head *count* per level
PUBLISHED_UNET_CONFIG = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}


def unet_config(configs: dict) -> dict:
    """diffusers' SDXL UNet2DConditionModel config for our UNetConfig: "text_time" instead of the
    projection class embedding (the same label_emb MLP, fed by diffusers' own size features)."""
    unet, te2 = configs["unet"], configs["text_encoder_2"]
    config = ref_unet.diffusers_unet_config(unet)
    for key in ("class_embed_type", "projection_class_embeddings_input_dim"):
        config.pop(key, None)
    return {**config, "addition_embed_type": "text_time",
            "addition_time_embed_dim": (unet.adm_in_channels - te2.embed_dim) // 6,
            "projection_class_embeddings_input_dim": unet.adm_in_channels}


def write_config_folder(folder: Path, configs: dict, scheduler: dict | None = None) -> Path:
    """A StableDiffusionXLPipeline folder without weights for `configs` (ldm's sdxl stage configs)."""
    folder = Path(folder)
    te1, te2 = configs["text_encoder"], configs["text_encoder_2"]
    components = {
        "unet": {"_class_name": "UNet2DConditionModel", **unet_config(configs)},
        "vae": {"_class_name": "AutoencoderKL", **ref_vae.diffusers_vae_config(configs["vae"]),
                "scaling_factor": configs["vae"].scaling_factor, "force_upcast": True},
        "text_encoder": {"architectures": ["CLIPTextModel"], **ref_clip.hf_clip_config(te1).to_dict()},
        "text_encoder_2": {"architectures": ["CLIPTextModelWithProjection"],
                           **ref_openclip.hf_config(te2, every_block=True).to_dict()},
        "scheduler": scheduler or SCHEDULER_CONFIG,
    }
    for name, cfg in components.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        fname = "scheduler_config.json" if name == "scheduler" else "config.json"
        (folder / name / fname).write_text(json.dumps(cfg, default=list))
    write_tokenizer_files(folder / "tokenizer")
    write_tokenizer_files(folder / "tokenizer_2", pad_token="!")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None], "feature_extractor": [None, None]}))
    return folder


def load_with_diffusers(path: Path, configs: dict, config_folder: Path, **kwargs):
    """diffusers' StableDiffusionXLPipeline from an ldm-written SDXL single file, offline."""
    from diffusers import StableDiffusionXLPipeline

    write_config_folder(config_folder, configs)
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config_folder), local_files_only=True,
                                                      **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
