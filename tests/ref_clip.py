"""Reference builders for the CLIP text encoder: transformers.CLIPTextModel for a config of ours."""
from __future__ import annotations

import functools

import torch

from ldm.clip import CLIPTextConfig, CLIPTextModel


def hf_clip_config(cfg: CLIPTextConfig):
    from transformers import CLIPTextConfig as HFConfig

    return HFConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings, layer_norm_eps=cfg.layer_norm_eps,
        hidden_act="quick_gelu", bos_token_id=min(49406, cfg.vocab_size - 2),
        eos_token_id=min(49407, cfg.vocab_size - 1), pad_token_id=1,
        projection_dim=cfg.hidden_size,
    )


def hf_state_dict_to_ours(sd: dict) -> dict:
    """transformers 5 drops the `text_model.` prefix from CLIPTextModel.state_dict(); files
    written by older versions (and single-file checkpoints) keep it. Ours always has it."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in sd.items() if not k.endswith("position_ids")}


def ours_to_hf_state_dict(sd: dict, hf_model) -> dict:
    hf_keys = set(hf_model.state_dict())
    return {(k if k in hf_keys else k.removeprefix("text_model.")): v for k, v in sd.items()}


def pair(cfg: CLIPTextConfig, seed: int = 0):
    """(ours, transformers') text encoders with the same random weights, in eval mode."""
    from transformers import CLIPTextModel as HFModel

    torch.manual_seed(seed)
    ours = CLIPTextModel(cfg).eval()
    for p in ours.parameters():  # nn.Embedding / Linear inits differ from HF's; any weights will do
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.normal_(p, std=0.1)
    hf = HFModel(hf_clip_config(cfg))  # not on "meta": its position_ids buffer must be real
    hf.load_state_dict(ours_to_hf_state_dict(ours.state_dict(), hf), strict=True)
    return ours, hf.eval()


@functools.lru_cache(maxsize=1)
def full_pair():
    """Full ViT-L/14 text tower, random weights, built once per test run."""
    return pair(CLIPTextConfig())


STORED_CONFIG = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4)


def example_ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Token windows shaped like the tokenizer's: BOS, some tokens, EOS, EOS padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, 77), 49407)
    ids[:, 0] = 49406
    for b in range(batch):
        n = 5 + 7 * b
        ids[b, 1:1 + n] = torch.randint(0, 49406, (n,), generator=g)
    return ids


def reference_tensors() -> dict[str, torch.Tensor]:
    # A 1,000-token vocabulary keeps the stored file small (the tiny config's full 49,408-row
    # embedding alone would be 6 MB); the ids are drawn below it, the specials folded in.
    ours, hf = pair(STORED_CONFIG)
    ids = example_ids() % STORED_CONFIG.vocab_size
    with torch.no_grad():
        out = hf(input_ids=ids, output_hidden_states=True)
    tensors = {f"weights.{k}": v for k, v in ours.state_dict().items()}
    tensors["inputs.ids"] = ids
    tensors["outputs.last_hidden_state"] = out.last_hidden_state
    for i, h in enumerate(out.hidden_states):
        tensors[f"outputs.hidden_states.{i}"] = h
    return tensors
