"""Reference builders for the OpenCLIP text towers: transformers.CLIPTextModel in SD 2's
configuration (ViT-H, the blocks that run), CLIPTextModelWithProjection in SDXL's (bigG, every block).

Our tower is built first (its state_dict has the single-file names after
`cond_stage_model.model.`), then converted with diffusers' own single-file converter
`convert_open_clip_checkpoint`, which knows the real open_clip key names and splits the fused
in_proj into q_proj/k_proj/v_proj: a wrong name in ldm/openclip.py shows up as a missing key
when the converted dict is loaded into transformers with strict=True.

The converter drops block 23 (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE: SD 2 never runs it) and
text_projection by their full-size names. For other sizes the blocks that do not run are
dropped here, before converting, and the rest is the converter's work. SDXL's tower is written
under its own prefix (`conditioner.embedders.1.model.`, which that list does not name), every
block and text_projection included, as diffusers' SDXL single-file loader converts it: the
converter transposes text_projection into a Linear's weight.

transformers and diffusers are imported inside the functions, so `import ref_openclip` works
without them.
"""
from __future__ import annotations

import functools

import torch

from ldm.openclip import OpenCLIPTextConfig, OpenCLIPTextModel

PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders.1.model."


def hf_config(cfg: OpenCLIPTextConfig, every_block: bool = False):
    """transformers' CLIPTextConfig of the same function, exact GELU: only the blocks SD 2 runs,
    or (every_block) all of them with the pooling open_clip does, the argmax of the ids
    (transformers takes that path for eos_token_id=2, the legacy value)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers if every_block else cfg.num_hidden_layers, num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.context_length, layer_norm_eps=cfg.layer_norm_eps,
        hidden_act="gelu", bos_token_id=49406, eos_token_id=2 if every_block else 49407, pad_token_id=0,
        projection_dim=cfg.embed_dim,
    )


def ours(cfg: OpenCLIPTextConfig, seed: int = 0) -> OpenCLIPTextModel:
    """Our tower with random weights of the scale real ones have (std 0.02, biases/LN 0.1 around their init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = OpenCLIPTextModel(cfg)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_final.weight")):
                p.copy_(1 + 0.1 * noise)
            elif p.dim() < 2:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.02 * noise)
    return model


def single_file(model: OpenCLIPTextModel, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """Our state dict under the single-file prefix, as SD 2's (or, with SDXL_PREFIX, SDXL's) checkpoints hold it."""
    return {prefix + k: v for k, v in model.state_dict().items()}


def _converted_into(hf, checkpoint: dict, prefix: str):
    """Load diffusers' conversion of `checkpoint` into the meta-built `hf`, strictly; make its buffers real."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    converted = convert_open_clip_checkpoint(hf, checkpoint, prefix=prefix)
    hf_keys = set(hf.state_dict())
    # transformers 5's CLIPTextModel keys have no `text_model.` prefix; the converter writes it
    # (CLIPTextModelWithProjection keeps it)
    converted = {(k if k in hf_keys else k.removeprefix("text_model.")): v for k, v in converted.items()}
    hf.load_state_dict(converted, strict=True, assign=True)
    for name, buf in list(hf.named_buffers()):  # the non-persistent position_ids (0..76) stayed on meta
        owner, _, leaf = name.rpartition(".")
        hf.get_submodule(owner).register_buffer(leaf, torch.arange(buf.shape[-1]).expand(buf.shape),
                                                persistent=False)
    return hf


def to_transformers(model: OpenCLIPTextModel):
    """transformers' CLIPTextModel with `model`'s weights, through diffusers' converter (SD 2's blocks)."""
    from transformers import CLIPTextModel

    cfg = model.config
    checkpoint = single_file(model)
    unused = [f"{PREFIX}transformer.resblocks.{i}." for i in range(cfg.num_hidden_layers, cfg.layers)]
    checkpoint = {k: v for k, v in checkpoint.items() if not k.startswith(tuple(unused))}
    with torch.device("meta"):  # no weight init: the full-size pair costs one init (ours)
        hf = CLIPTextModel(hf_config(cfg)).eval()
    return _converted_into(hf, checkpoint, PREFIX)


def to_transformers_with_projection(model: OpenCLIPTextModel):
    """transformers' CLIPTextModelWithProjection of every block with `model`'s weights, written
    under SDXL's prefix and converted by diffusers as its SDXL loader does (text_projection transposed)."""
    from transformers import CLIPTextModelWithProjection

    with torch.device("meta"):
        hf = CLIPTextModelWithProjection(hf_config(model.config, every_block=True)).eval()
    return _converted_into(hf, single_file(model, SDXL_PREFIX), SDXL_PREFIX)


def pair(cfg: OpenCLIPTextConfig, seed: int = 0):
    """(ours, transformers') towers with the same random weights, in eval mode."""
    model = ours(cfg, seed)
    return model, to_transformers(model)


def sdxl_pair(cfg: OpenCLIPTextConfig, seed: int = 0):
    """(ours, transformers' CLIPTextModelWithProjection of every block) with the same random weights."""
    model = ours(cfg, seed)
    return model, to_transformers_with_projection(model)


@functools.lru_cache(maxsize=1)
def full_sdxl_pair():
    """Full ViT-bigG/14 text tower (~695M parameters, 2.8 GB in fp32), built once per test run:
    meta, to_empty, then ldm.weights.random_init_; transformers' model shares its tensors but q/k/v."""
    from ldm.weights import random_init_

    with torch.device("meta"):
        model = OpenCLIPTextModel(OpenCLIPTextConfig.bigg())
    model = random_init_(model.to_empty(device="cpu")).eval()
    return model, to_transformers_with_projection(model)


@functools.lru_cache(maxsize=1)
def full_pair():
    """Full ViT-H/14 text tower, random weights, built once per test run."""
    return pair(OpenCLIPTextConfig.full())


def example_ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Token windows shaped like SD 2's tokenizer gives them: BOS, some tokens, EOS, 0 padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, 77, dtype=torch.long)
    ids[:, 0] = 49406
    for b in range(batch):
        n = 5 + 7 * b
        ids[b, 1:1 + n] = torch.randint(0, 49406, (n,), generator=g)
        ids[b, 1 + n] = 49407
    return ids
