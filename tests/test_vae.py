"""The VAE (ldm/vae.py) against diffusers.AutoencoderKL on the same weights.

Weights reach diffusers through its own single-file converter (see ref_vae.py), so every
parity test here also checks that our parameter names are the real CompVis ones.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from ldm.vae import (SCALING_FACTOR, AttnBlock, AutoencoderKL, DiagonalGaussian, Downsample,
                     ResnetBlock, Upsample, VAEConfig)

REFERENCE = Path(__file__).resolve().parent / "reference" / "vae_tiny.safetensors"
TOL = dict(atol=1e-4, rtol=1e-4)


def _pair():
    ref_vae = pytest.importorskip("ref_vae")
    pytest.importorskip("diffusers")
    return ref_vae, *ref_vae.tiny_pair()


# --- layout ----------------------------------------------------------------------------------


def test_full_size_key_counts_match_sd1_checkpoint():
    with torch.device("meta"):
        sd = AutoencoderKL(VAEConfig()).state_dict()
    count = lambda prefix: sum(k.startswith(prefix) for k in sd)  # noqa: E731
    assert (len(sd), count("encoder."), count("decoder."), count("quant_conv."),
            count("post_quant_conv.")) == (248, 106, 138, 2, 2)
    # the single-head attention is four 1x1 convolutions, as in the checkpoint
    for name in ("q", "k", "v", "proj_out"):
        assert sd[f"decoder.mid.attn_1.{name}.weight"].shape == (512, 512, 1, 1)
    assert sd["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sd["decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in sd  # level 0 is the full-resolution one


@pytest.mark.parametrize("cfg", [VAEConfig(), VAEConfig.tiny()], ids=["full", "tiny"])
def test_diffusers_converter_maps_every_key(cfg):
    ref_vae = pytest.importorskip("ref_vae")
    pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
    converted = ref_vae.to_diffusers_state_dict(ours.state_dict(), cfg)
    theirs = ref_vae.diffusers_vae(cfg, device="meta").state_dict()
    assert sorted(converted) == sorted(theirs)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_our_state_dict_as_single_file_loads_in_diffusers(tmp_path):
    """Write ours as an SD single-file checkpoint (`first_stage_model.` keys) and load it with
    diffusers' `from_single_file` (a local config folder keeps it offline)."""
    import json

    ref_vae = pytest.importorskip("ref_vae")
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    cfg = VAEConfig.tiny()
    ours = ref_vae.randomize_(AutoencoderKL(cfg)).eval()
    save_file({f"first_stage_model.{k}": v.contiguous() for k, v in ours.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(
        json.dumps({"_class_name": "AutoencoderKL", **ref_vae.diffusers_vae_config(cfg)}))
    ref = diffusers.AutoencoderKL.from_single_file(
        str(tmp_path / "model.safetensors"), config=str(tmp_path / "config"), local_files_only=True).eval()
    z = ref_vae.example_latent()
    with torch.no_grad():
        assert_close(ours.decode(z), ref.decode(z).sample, **TOL)


def test_config_validation():
    with pytest.raises(ValueError, match="norm_groups"):
        VAEConfig(ch=24, norm_groups=32)
    with pytest.raises(ValueError, match="ch_mult"):
        VAEConfig(ch_mult=())
    with pytest.raises(ValueError, match="num_res_blocks"):
        VAEConfig(num_res_blocks=0)
    assert VAEConfig().downsample_factor == 8 and VAEConfig.tiny().downsample_factor == 8


# --- every block type, tiny config -----------------------------------------------------------


def _x(*shape, seed=5):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_resnet_blocks_match():
    _, ours, ref = _pair()
    # with and without the 1x1 nin_shortcut (encoder level 1 widens 8 -> 16)
    for mine, theirs, c in [(ours.encoder.down[0].block[0], ref.encoder.down_blocks[0].resnets[0], 8),
                            (ours.encoder.down[1].block[0], ref.encoder.down_blocks[1].resnets[0], 8),
                            (ours.decoder.up[0].block[0], ref.decoder.up_blocks[3].resnets[0], 16)]:
        assert isinstance(mine, ResnetBlock)
        x = _x(2, c, 8, 8)
        with torch.no_grad():
            assert_close(mine(x), theirs(x, None), **TOL)


def test_attention_block_matches():
    _, ours, ref = _pair()
    for mine, theirs in [(ours.encoder.mid.attn_1, ref.encoder.mid_block.attentions[0]),
                         (ours.decoder.mid.attn_1, ref.decoder.mid_block.attentions[0])]:
        assert isinstance(mine, AttnBlock)
        x = _x(2, 16, 6, 5)  # non-square: the (h w) flattening order matters
        with torch.no_grad():
            assert_close(mine(x), theirs(x), **TOL)


def test_attention_backends_agree():
    ref_vae, ours, ref = _pair()
    x = ref_vae.example_image(size=32)
    vae = copy.deepcopy(ours)
    with torch.no_grad():
        expected = ref.encode(x).latent_dist.mean
        for backend in ("math", "sdpa", "auto"):
            vae.attention_backend = backend
            assert vae.encoder.mid.attn_1.backend == vae.decoder.mid.attn_1.backend == backend
            assert_close(vae.encode(x).mean, expected, **TOL)
    with pytest.raises(ValueError, match="attention_backend='flash'"):
        vae.attention_backend = "flash"


def test_resampling_blocks_match():
    _, ours, ref = _pair()
    down, up = ours.encoder.down[0].downsample, ours.decoder.up[1].upsample
    assert isinstance(down, Downsample) and isinstance(up, Upsample)
    x = _x(2, 8, 9, 6)  # odd size: the asymmetric (0, 1, 0, 1) pad decides the output grid
    with torch.no_grad():
        assert_close(down(x), ref.encoder.down_blocks[0].downsamplers[0](x), **TOL)
        x = _x(2, 16, 5, 7)
        assert_close(up(x), ref.decoder.up_blocks[2].upsamplers[0](x), **TOL)


def test_levels_and_mid_blocks_match():
    _, ours, ref = _pair()
    n = len(ours.cfg.ch_mult)
    with torch.no_grad():
        for i in range(n):
            c_in = ours.encoder.down[i].block[0].norm1.num_channels
            x = _x(1, c_in, 16, 16, seed=i)
            assert_close(ours.encoder.down[i](x), ref.encoder.down_blocks[i](x), **TOL)
            c_in = ours.decoder.up[i].block[0].norm1.num_channels
            x = _x(1, c_in, 4, 4, seed=10 + i)
            assert_close(ours.decoder.up[i](x), ref.decoder.up_blocks[n - 1 - i](x), **TOL)
        x = _x(2, 16, 4, 4)
        assert_close(ours.encoder.mid(x), ref.encoder.mid_block(x), **TOL)
        assert_close(ours.decoder.mid(x), ref.decoder.mid_block(x), **TOL)


def test_encoder_and_decoder_match():
    ref_vae, ours, ref = _pair()
    x, z = ref_vae.example_image(), ref_vae.example_latent()
    with torch.no_grad():
        assert_close(ours.encoder(x), ref.encoder(x), **TOL)
        assert_close(ours.decoder(z), ref.decoder(z), **TOL)


# --- the whole model -------------------------------------------------------------------------


def _check_model(ref_vae, ours, ref, x, z):
    with torch.no_grad():
        post, dist = ours.encode(x), ref.encode(x).latent_dist
        for name in ("mean", "logvar", "std", "var"):
            assert_close(getattr(post, name), getattr(dist, name), **TOL)
        assert_close(post.mode(), dist.mode(), **TOL)
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        assert_close(post.sample(g1), dist.sample(g2), **TOL)
        assert_close(post.kl(), dist.kl(), **TOL)
        assert_close(ours.decode(z), ref.decode(z).sample, **TOL)
        assert_close(ours(x), ref(x).sample, **TOL)


def test_tiny_model_matches_diffusers():
    ref_vae, ours, ref = _pair()
    _check_model(ref_vae, ours, ref, ref_vae.example_image(size=48), ref_vae.example_latent(size=6))


@pytest.mark.full
def test_full_size_model_matches_diffusers():
    """SD 1.x architecture, random weights: encode at 64 px, decode an 8x8 latent."""
    ref_vae = pytest.importorskip("ref_vae")
    pytest.importorskip("diffusers")
    ours, ref = ref_vae.full_pair()
    _check_model(ref_vae, ours, ref, ref_vae.example_image(batch=1, size=64),
                 ref_vae.example_latent(batch=1, size=8))


def test_gradients_match_diffusers():
    """Training still works: the in-place SiLU and residual add keep autograd intact."""
    ref_vae, ours, ref = _pair()
    x = ref_vae.example_image(batch=1, size=16).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    loss = ours(x).square().mean() + ours.encode(x).kl().mean()
    loss_ref = ref(x_ref).sample.square().mean() + ref.encode(x_ref).latent_dist.kl().mean()
    loss.backward()
    loss_ref.backward()
    assert_close(x.grad, x_ref.grad, **TOL)
    name = "decoder.up.0.block.0.conv1.weight"
    ref_grad = ref.decoder.up_blocks[3].resnets[0].conv1.weight.grad
    assert_close(dict(ours.named_parameters())[name].grad, ref_grad, **TOL)
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)


def test_shapes_and_scaling_factor():
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    x = torch.zeros(1, 3, 64, 40)
    with torch.no_grad():
        post = vae.encode(x)
        assert isinstance(post, DiagonalGaussian)
        assert post.mean.shape == post.logvar.shape == post.std.shape == (1, 4, 8, 5)
        image = vae.decode(post.mode())
        assert image.shape == (1, 3, 64, 40) and image.is_contiguous()  # NCHW, whatever runs inside
        assert post.mean.is_contiguous()
    assert SCALING_FACTOR == 0.18215


def test_posterior_sampling():
    moments = torch.cat([torch.full((2, 4, 3, 3), 2.0), torch.full((2, 4, 3, 3), -100.0)], dim=1)
    post = DiagonalGaussian(moments)
    assert_close(post.logvar, torch.full((2, 4, 3, 3), -30.0))  # clamped to [-30, 20]
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    assert_close(post.sample(g), 2.0 + torch.exp(torch.tensor(-15.0)) * eps)
    s1 = DiagonalGaussian(torch.zeros(1, 8, 4, 4)).sample(torch.Generator().manual_seed(1))
    s2 = DiagonalGaussian(torch.zeros(1, 8, 4, 4)).sample(torch.Generator().manual_seed(1))
    s3 = DiagonalGaussian(torch.zeros(1, 8, 4, 4)).sample(torch.Generator().manual_seed(2))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)


# --- stored reference tensors (no diffusers needed) ------------------------------------------


def test_matches_stored_reference_tensors():
    from safetensors.torch import load_file

    t = load_file(str(REFERENCE))
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    vae.load_state_dict({k.removeprefix("weights."): v for k, v in t.items() if k.startswith("weights.")},
                        strict=True)
    with torch.no_grad():
        post = vae.encode(t["inputs.x"])
        assert_close(post.mean, t["outputs.mean"], **TOL)
        assert_close(post.logvar, t["outputs.logvar"], **TOL)
        assert_close(post.std, t["outputs.std"], **TOL)
        assert_close(post.sample(torch.Generator().manual_seed(3)), t["outputs.sample_seed3"], **TOL)
        assert_close(vae.decode(t["inputs.z"]), t["outputs.decoded"], **TOL)


# --- tiled decoding --------------------------------------------------------------------------


class _AffineOnly(torch.nn.Module):
    """GroupNorm's affine without its statistics: a stand-in that makes every layer local."""

    def __init__(self, gn: torch.nn.GroupNorm):
        super().__init__()
        self.gn = gn

    def forward(self, x):
        return 0.2 * x * self.gn.weight[:, None, None] + self.gn.bias[:, None, None]


def _local_copy(vae: AutoencoderKL) -> AutoencoderKL:
    """The same decoder without the two global operations (GroupNorm statistics, attention)."""
    vae = copy.deepcopy(vae)
    torch.nn.init.zeros_(vae.decoder.mid.attn_1.proj_out.weight)  # attention adds only a bias
    for module in list(vae.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, _AffineOnly(child))
    return vae


def test_tiled_decode_is_exact_for_one_tile():
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    z = _x(2, 4, 6, 5)
    with torch.no_grad():
        assert torch.equal(vae.decode_tiled(z, tile_size=6, overlap=2), vae.decode(z))


def test_tiled_decode_blends_without_seams():
    """A 24x24 latent in 16x16 tiles overlapping by 8 (4 tiles). Where every layer is local,
    tiled equals untiled up to the zero padding each tile sees at its borders: the measured
    max error is 3.1e-3 (mean 1.1e-4) against outputs of mean magnitude 0.09; with overlap 0
    the seams show (max 2.8e-2). The full model differs more (see the next test)."""
    ref_vae = pytest.importorskip("ref_vae")
    vae = _local_copy(AutoencoderKL(VAEConfig.tiny()).eval())
    ref_vae.randomize_(vae)
    z = ref_vae.example_latent(batch=1, size=24)
    with torch.no_grad():
        full = vae.decode(z)
        tiled = vae.decode_tiled(z, tile_size=16, overlap=8)
        seamed = vae.decode_tiled(z, tile_size=16, overlap=0)
    assert tiled.shape == full.shape == (1, 3, 192, 192)
    assert_close(tiled, full, atol=1e-2, rtol=0)
    assert (tiled - full).abs().mean() < 5e-4
    assert (seamed - full).abs().max() > 4 * (tiled - full).abs().max()


def test_tiled_decode_full_model_is_close():
    """With GroupNorm statistics taken per tile (and attention seeing one tile), tiled decoding
    of the random tiny model differs from untiled by a mean of 0.024 (max 0.35) on outputs of
    mean magnitude 0.22: close, not equal. A trained VAE's statistics vary less across tiles."""
    ref_vae = pytest.importorskip("ref_vae")
    vae = ref_vae.randomize_(AutoencoderKL(VAEConfig.tiny()).eval())
    z = ref_vae.example_latent(batch=1, size=24)
    with torch.no_grad():
        full, tiled = vae.decode(z), vae.decode_tiled(z, tile_size=16, overlap=8)
    assert (tiled - full).abs().mean() < 0.25 * full.abs().mean()


def test_decode_tiled_rejects_bad_arguments():
    vae = AutoencoderKL(VAEConfig.tiny())
    z = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="overlap=4"):
        vae.decode_tiled(z, tile_size=4, overlap=4)
    with pytest.raises(ValueError, match="tile_size=0"):
        vae.decode_tiled(z, tile_size=0, overlap=0)
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        vae.decode_tiled(torch.zeros(1, 3, 8, 8))


# --- inputs and inspection -------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    vae = AutoencoderKL(VAEConfig.tiny())
    with pytest.raises(ValueError, match=r"x has shape \(1, 4, 16, 16\)"):
        vae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of the downsampling factor 8"):
        vae.encode(torch.zeros(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"z has shape \(1, 8, 2, 2\)"):
        vae.decode(torch.zeros(1, 8, 2, 2))


def test_capture_records_named_blocks_and_cleans_up():
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    x = torch.zeros(1, 3, 32, 32)
    names = ("encoder.conv_in", "encoder.down.0", "encoder.mid.attn_1", "decoder.up.1", "decoder.up.0")
    with torch.no_grad(), vae.capture(features=names) as cap:
        z = vae.encode(x).mode()
        img = vae.decode(z)
    assert {k: tuple(v.shape) for k, v in cap.features.items()} == {
        "encoder.conv_in": (1, 8, 32, 32), "encoder.down.0": (1, 8, 16, 16),
        "encoder.mid.attn_1": (1, 16, 4, 4), "decoder.up.1": (1, 16, 32, 32),
        "decoder.up.0": (1, 8, 32, 32)}
    assert all(len(m._forward_hooks) == 0 for m in vae.modules())
    with pytest.raises(ValueError, match="features entry 'encoder.nope' is not a module of the VAE"):
        with vae.capture(features=["encoder.nope"]):
            pass
    with pytest.raises(ValueError, match="attention entry 'encoder.mid' is not an attention layer"):
        with vae.capture(attention=["encoder.mid"]):
            pass
    assert img.shape == x.shape


def test_capture_attention_like_the_unet():
    """The same API and Capture as UNetModel.capture: the mid-block attention's probabilities, exact."""
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert vae.attention_layers() == ["encoder.mid.attn_1", "decoder.mid.attn_1"]
    layer = "encoder.mid.attn_1"
    with torch.no_grad(), vae.capture(features=["encoder.mid.block_1"], attention=[layer]) as cap:
        moments = vae.encode(x).mean
    block = vae.encoder.mid.attn_1
    h = block.norm(cap.features["encoder.mid.block_1"])  # the attention's input, (2, 16, 4, 4)
    q, k = (conv(h).flatten(2).transpose(1, 2) for conv in (block.q, block.k))  # (2, 16 pixels, 16)
    expected = (q @ k.transpose(1, 2) / 16**0.5).softmax(-1)[:, None]  # (2, 1, 16, 16)
    torch.testing.assert_close(cap.attention[layer], expected, rtol=1e-5, atol=1e-6)
    assert cap.sizes[layer] == (4, 4) and cap.token_maps(layer).shape == (2, 1, 16, 4, 4)
    with torch.no_grad():  # capturing changes nothing, and everything is unhooked afterwards
        torch.testing.assert_close(vae.encode(x).mean, moments, rtol=1e-5, atol=1e-6)
    assert block.probs_hook is None and not any(m._forward_hooks or m._forward_pre_hooks for m in vae.modules())


# --- a real checkpoint, when there is one ----------------------------------------------------


@pytest.mark.weights
def test_real_checkpoint_loads_strictly(real_checkpoint):
    checkpoint = pytest.importorskip("ldm.checkpoint")
    ck = checkpoint.read(real_checkpoint)
    vae = AutoencoderKL(VAEConfig())
    vae.load_state_dict(ck.vae, strict=True)
    x = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).mode())
    assert (recon - x).abs().mean() < 0.1  # a trained VAE reconstructs a smooth ramp closely
