"""Reference builders for the checkpoint tests: diffusers / transformers models in the SD 1.x
layouts (tiny with random weights; full size on the meta device), and writers for synthetic
checkpoint files: CompVis single files (.safetensors, Lightning-style .ckpt), diffusers folders,
pickles that try to run code, and key sets of the families ldm refuses.

The CompVis names come from our key map (ldm.checkpoint); the tests check that map against
diffusers' own CompVis -> diffusers converter, so the synthetic files are only as right as a
map that the converter confirmed.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm import checkpoint as ck
from ldm import families

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
TINY_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2, latent_channels=4,
                norm_num_groups=4, sample_size=16)
TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
                 max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
FULL_UNET = dict(sample_size=64, cross_attention_dim=768)   # with diffusers' defaults: SD 1.x
FULL_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
FULL_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)  # ViT-L/14
CONFIGS = {"tiny": (TINY_UNET, TINY_VAE, TINY_CLIP), "full": (FULL_UNET, FULL_VAE, FULL_CLIP)}
TABLES = {"tiny": ck.key_map(ck.KeyMapConfig.tiny()), "full": ck.DIFFUSERS_TO_COMPVIS}


def diffusers_models(size: str = "tiny", in_channels: int = 4, **unet_overrides):
    """(UNet2DConditionModel, AutoencoderKL, CLIPTextModel); full size is built on the meta device."""
    if size == "full":
        return _full_models(in_channels)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    unet_cfg, vae_cfg, clip_cfg = CONFIGS[size]
    torch.manual_seed(0)
    return (UNet2DConditionModel(**{**unet_cfg, "in_channels": in_channels, **unet_overrides}),
            AutoencoderKL(**vae_cfg), CLIPTextModel(CLIPTextConfig(**clip_cfg)))


@functools.lru_cache(maxsize=None)
def _full_models(in_channels: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):                         # shapes and names only: no 4 GB of RAM, no RNG
        return (UNet2DConditionModel(**{**FULL_UNET, "in_channels": in_channels}), AutoencoderKL(**FULL_VAE),
                CLIPTextModel(CLIPTextConfig(**FULL_CLIP)))


def diffusers_state_dicts(size: str = "tiny", in_channels: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    unet, vae, clip = diffusers_models(size, in_channels)
    return {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": clip.state_dict()}


def compvis_stages(size: str = "tiny", in_channels: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    """Our per-stage state dicts: the diffusers models' tensors under CompVis names."""
    return {s: ck.diffusers_to_compvis(s, sd, TABLES[size])
            for s, sd in diffusers_state_dicts(size, in_channels).items()}


def single_file(stages: dict[str, dict[str, torch.Tensor]], *, extras: bool = True) -> dict[str, torch.Tensor]:
    """A CompVis single-file state dict; extras adds what real files carry besides the stages:
    schedule buffers, the CLIP position_ids buffer and an EMA copy of the UNet (EMA = UNet + 1)."""
    sd = {families.get("sd1").prefixes[s] + k: t for s, stage in stages.items() for k, t in stage.items()}
    if extras:
        sd["betas"] = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
        sd["alphas_cumprod"] = torch.cumprod(1 - sd["betas"], 0)
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(10)
        for k, t in stages["unet"].items():
            sd["model_ema.diffusion_model" + k.replace(".", "")] = t + 1
    return sd


def write_safetensors(sd: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None) -> Path:
    save_file({k: (t.to(dtype) if dtype and t.is_floating_point() else t).contiguous() for k, t in sd.items()},
              str(path))
    return path


@contextmanager
def fake_modules(*names: str):
    """Importable stand-ins for modules a training run had (pytorch_lightning ...), for pickling only."""
    added = [n for n in names if n not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    try:
        yield [sys.modules[n] for n in names]
    finally:
        for name in added:
            del sys.modules[name]


def write_lightning_ckpt(sd: dict[str, torch.Tensor], path: Path) -> Path:
    """A .ckpt like the original SD releases: the state dict beside Lightning training state,
    whose pickle names pytorch_lightning classes (a callback class as a dict key, an object of
    an AttributeDict dict subclass, a plain object), which torch.load(weights_only=True) refuses."""
    mods = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint",
            "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing")
    with fake_modules(*mods) as (_, _, callbacks, _, parsing):
        ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": callbacks.__name__})
        AttributeDict = type("AttributeDict", (dict,), {"__module__": parsing.__name__})
        callbacks.ModelCheckpoint, parsing.AttributeDict = ModelCheckpoint, AttributeDict
        hparams = AttributeDict(lr=1e-4, image_size=64)
        cb = ModelCheckpoint()
        cb.best_model_path, cb.best_model_score = "/logs/last.ckpt", torch.tensor(0.25)
        torch.save({"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
                    "state_dict": sd, "hyper_parameters": hparams, "trainer": cb,
                    "callbacks": {ModelCheckpoint: {"monitor": None, "best_model_score": None,
                                                    "dirpath": Path("/logs/checkpoints")}},
                    "optimizer_states": [], "lr_schedulers": []}, path)
    return path


class _Payload:
    """Pickles as a call: func(*args)."""
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def malicious_payloads(marker: Path) -> dict[str, object]:
    """Objects whose unpickling would create `marker` (each by a different route)."""
    import subprocess
    cmd = f"open({str(marker)!r}, 'w').close()"
    return {"os.system": _Payload(os.system, f"touch {marker}"),
            "builtins.exec": _Payload(exec, cmd),
            "builtins.eval": _Payload(eval, cmd),
            "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
            "builtins.__import__": _Payload(__import__, "os")}


def write_diffusers_folder(path: Path, size: str = "tiny", *, weights: str = "safetensors",
                           in_channels: int = 4, **unet_overrides) -> Path:
    """model_index.json, unet/ vae/ text_encoder/ with config.json and weights:
    weights = "safetensors" | "bin" (pickled) | "fp16" (only the .fp16.safetensors variant)."""
    unet, vae, clip = diffusers_models(size, in_channels, **unet_overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]}))
    for name, model, stem in (("unet", unet, "diffusion_pytorch_model"), ("vae", vae, "diffusion_pytorch_model"),
                              ("text_encoder", clip, "model" if weights != "bin" else "pytorch_model")):
        folder = path / name
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(model.config.to_json_string() if name == "text_encoder"
                                            else json.dumps(dict(model.config)))
        sd = {k: t.contiguous() for k, t in model.state_dict().items()}
        if weights == "bin":
            torch.save(sd, folder / f"{stem}.bin")
        elif weights == "fp16":
            write_safetensors(sd, folder / f"{stem}.fp16.safetensors", torch.float16)
        else:
            write_safetensors(sd, folder / f"{stem}.safetensors")
    return path


OTHER_FAMILIES = ("sd2-openclip", "sd2-linear-proj", "sdxl", "lora-kohya", "lora-diffusers", "lora-peft", "ti-a1111",
                  "ti-emb-params", "ti-single", "vae-only", "diffusers-unet-file", "instruct-pix2pix",
                  "not-a-checkpoint")


@functools.lru_cache(maxsize=None)
def other_family_key_sets() -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    """Synthetic state dicts of families ldm does not read: {name: (state dict, words the error must name)}."""
    t = torch.zeros(2, 2)
    sd1 = single_file(compvis_stages("tiny"), extras=False)
    sd2_linear = {k: (v[:, :, 0, 0] if k.endswith("proj_in.weight") else v) for k, v in sd1.items()}
    instruct = {**sd1, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 8, 3, 3)}
    return {
        "sd2-openclip": ({"model.diffusion_model.input_blocks.0.0.weight": t,
                          "cond_stage_model.model.token_embedding.weight": t}, "SD 2.x"),
        "sd2-linear-proj": (sd2_linear, "SD 2.x"),
        "sdxl": ({"model.diffusion_model.input_blocks.0.0.weight": t,
                  "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": t}, "SDXL"),
        "lora-kohya": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t,
                        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0)}, "LoRA"),
        "lora-diffusers": ({"unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": t}, "LoRA"),
        "lora-peft": ({"base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight": t}, "LoRA"),
        "ti-a1111": ({"string_to_param": {"*": torch.zeros(2, 768)}, "name": "cat"}, "textual-inversion"),
        "ti-emb-params": ({"emb_params": torch.zeros(2, 768)}, "textual-inversion"),
        "ti-single": ({"<cat-toy>": torch.zeros(768)}, "textual-inversion"),
        "vae-only": ({"encoder.conv_in.weight": t, "decoder.conv_out.weight": t, "quant_conv.weight": t},
                     "VAE-only"),
        "diffusers-unet-file": ({"conv_in.weight": t, "down_blocks.0.resnets.0.norm1.weight": t}, "diffusers"),
        "instruct-pix2pix": (instruct, "8 input channels"),
        "not-a-checkpoint": ({f"layer{i}.weight": torch.zeros(64, 64) for i in range(8)}, "not a Stable Diffusion"),
    }


def reference_tensors() -> dict[str, torch.Tensor]:
    """inputs.*: a tiny CompVis single file; outputs.<stage>.*: what diffusers' own converters
    (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint) make of it.
    Our key map must turn the outputs back into the inputs, checked without diffusers installed.
    Stored in float16 to keep the file small: the test compares names and exact values."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    unet, vae, _ = diffusers_models("tiny")
    sd = single_file(compvis_stages("tiny"), extras=False)
    outputs = {"unet": convert_ldm_unet_checkpoint(sd, dict(unet.config)),
               "vae": convert_ldm_vae_checkpoint(sd, dict(vae.config)),
               "text_encoder": convert_ldm_clip_checkpoint(sd)}
    out = {f"inputs.{k}": t.half() for k, t in sd.items()}
    out.update({f"outputs.{s}.{k}": t.half() for s, d in outputs.items() for k, t in d.items()})
    return out
