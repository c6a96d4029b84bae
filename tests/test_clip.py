"""The CLIP text encoder against transformers.CLIPTextModel on the same weights."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import ref_clip
from ldm.clip import CLIPTextConfig, CLIPTextModel

REFERENCE = Path(__file__).parent / "reference" / "clip_tiny.safetensors"


@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
def test_tiny_matches_transformers_every_layer(backend):
    ours, hf = ref_clip.pair(CLIPTextConfig.tiny())
    ours.backend = backend
    ids = ref_clip.example_ids(batch=3)
    with torch.no_grad():
        ctx, hidden = ours(ids, return_hidden_states=True)
        ref = hf(input_ids=ids, output_hidden_states=True)
    assert ctx.shape == (3, 77, 32)
    assert_close(ctx, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert len(hidden) == len(ref.hidden_states) == 3
    for h, r in zip(hidden, ref.hidden_states):
        assert_close(h, r, atol=1e-5, rtol=1e-5)


def test_clip_skip_matches_transformers_penultimate_layer():
    ours, hf = ref_clip.pair(CLIPTextConfig.tiny())
    ids = ref_clip.example_ids()
    with torch.no_grad():
        skipped = ours(ids, clip_skip=1)
        ref = hf(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        ref = getattr(hf, "text_model", hf).final_layer_norm(ref)
    assert_close(skipped, ref, atol=1e-5, rtol=1e-5)


def test_sdxl_context_is_the_penultimate_hidden_state_without_final_norm():
    """SDXL's first tower (CLIP ViT-L) gives hidden_states[-2] with no final layer norm (diffusers'
    encode_prompt; SD 1.x's clip_skip=1 applies it): our hidden_states list is that, as it is."""
    ours, hf = ref_clip.pair(CLIPTextConfig.tiny())
    ids = ref_clip.example_ids()
    with torch.no_grad():
        _, hidden = ours(ids, return_hidden_states=True)
        ref = hf(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        normed = ours(ids, clip_skip=1)
    assert_close(hidden[-2], ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hidden[-2], normed, atol=1e-3)   # the final LN is not applied


def test_causal_mask_makes_early_tokens_blind_to_later_ones():
    ours, _ = ref_clip.pair(CLIPTextConfig.tiny())
    a = ref_clip.example_ids(batch=1)
    b = a.clone()
    b[0, 10:] = 320  # change everything from position 10 on
    with torch.no_grad():
        ca, cb = ours(a), ours(b)
    assert_close(ca[:, :10], cb[:, :10])
    assert not torch.allclose(ca[:, 10:], cb[:, 10:])


def test_attention_goes_through_ldm_attention_with_causal(monkeypatch):
    """Every layer calls ldm.attention.attention(..., causal=True) with the model's backend;
    "triton" is refused there (the flash kernel has no mask), "auto" is the default."""
    import ldm.clip

    ours = CLIPTextModel(ref_clip.STORED_CONFIG).eval()
    assert ours.backend == "auto"
    calls = []
    real = ldm.clip.attention
    monkeypatch.setattr(ldm.clip, "attention",
                        lambda q, k, v, backend, causal: calls.append((backend, causal)) or real(q, k, v, backend, causal=causal))
    ids = ref_clip.example_ids(batch=1) % 1000
    with torch.no_grad():
        ours(ids)
    assert calls == [("auto", True)] * 2                    # one per layer
    ours.backend = "triton"
    with pytest.raises(ValueError, match=r"causal=True is not supported by backend='triton'"):
        ours(ids)
    with pytest.raises(ValueError, match=r"backend='fast' is not one of"):
        CLIPTextModel(ref_clip.STORED_CONFIG, backend="fast")


def test_stored_reference_without_transformers():
    stored = load_file(REFERENCE)
    weights = {k.removeprefix("weights."): v for k, v in stored.items() if k.startswith("weights.")}
    model = CLIPTextModel(ref_clip.STORED_CONFIG).eval()
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        ctx, hidden = model(stored["inputs.ids"], return_hidden_states=True)
    assert_close(ctx, stored["outputs.last_hidden_state"], atol=1e-5, rtol=1e-5)
    for i, h in enumerate(hidden):
        assert_close(h, stored[f"outputs.hidden_states.{i}"], atol=1e-5, rtol=1e-5)


def test_parameter_names_are_the_checkpoint_keys():
    keys = set(CLIPTextModel().state_dict())
    assert len(keys) == 196  # DESIGN.md §5: cond_stage_model.transformer.text_model.* 196
    assert "text_model.encoder.layers.11.self_attn.q_proj.weight" in keys
    assert "text_model.final_layer_norm.bias" in keys


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, 78, dtype=torch.long), "at most 77"),
    (torch.zeros(77, dtype=torch.long), r"shape \(B, T\)"),
    (torch.zeros(1, 77), "integer"),
])
def test_bad_ids_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        CLIPTextModel(CLIPTextConfig.tiny())(bad)


@pytest.mark.full
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_full_size_matches_transformers(backend):
    ours, hf = ref_clip.full_pair()
    ours.backend = backend
    ids = ref_clip.example_ids(batch=2)
    with torch.no_grad():
        ctx = ours(ids)
        ref = hf(input_ids=ids).last_hidden_state
    assert ctx.shape == (2, 77, 768)
    err = (ctx - ref).abs().max().item()
    print(f"CLIP full-size ({backend}) max |ours - transformers| = {err:.2e}")
    assert_close(ctx, ref, atol=1e-4, rtol=1e-4)
