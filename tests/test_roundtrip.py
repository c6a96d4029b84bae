"""Our networks' names are the real SD 1.x names, proved by diffusers' own converter.

A random-weight checkpoint written by `ldm.weights.write_single_file` (the CompVis single-file
layout) is loaded by diffusers' `StableDiffusionPipeline.from_single_file`, offline, with a local
config folder. diffusers' converter knows the true CompVis key names: every tensor must arrive
(same count per stage, same values under our key map) and the networks must compute what ours
compute. Then the same checkpoint saved by diffusers as a folder must read back, through
`ldm.checkpoint.read`, to exactly the tensors of the single file.
"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from ldm import checkpoint, weights

pytest.importorskip("diffusers")
import ref_sd  # noqa: E402  (needs diffusers/transformers)

STAGE_ATTR = {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder"}


def _diffusers_as_ours(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' loaded state dicts, mapped back to our names with ldm.checkpoint's table."""
    table = checkpoint.key_map(checkpoint.KeyMapConfig.from_diffusers(
        dict(pipe.unet.config), dict(pipe.vae.config)))
    out = {}
    for stage in ("unet", "vae", "text_encoder"):
        sd = getattr(pipe, stage).state_dict()
        out[stage] = checkpoint.diffusers_to_compvis(stage, sd, table)
    return out


def _assert_same_tensors(ours: dict, theirs: dict, what: str):
    assert sorted(ours) == sorted(theirs), (
        f"{what}: only ours {sorted(set(ours) - set(theirs))[:5]}, "
        f"only theirs {sorted(set(theirs) - set(ours))[:5]}")
    for k in ours:
        assert_close(ours[k], theirs[k], atol=0, rtol=0, msg=f"{what}: {k}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    te, unet, vae, configs = weights.random_models("tiny", seed=3)
    path = weights.write_single_file(d / "tiny.safetensors", te, unet, vae, configs=configs)
    pipe = ref_sd.load_with_diffusers(path, configs, d / "config")
    return path, (te, unet, vae), pipe


def test_diffusers_single_file_loader_finds_every_tensor(tiny):
    path, (te, unet, vae), pipe = tiny
    theirs = _diffusers_as_ours(pipe)
    for stage, module in (("text_encoder", te), ("unet", unet), ("vae", vae)):
        _assert_same_tensors(module.state_dict(), theirs[stage], stage)


def test_diffusers_networks_compute_what_ours_compute(tiny):
    _, (te, unet, vae), pipe = tiny
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[49406, 320, 1929, 3309, 320, 3801, 49407] + [49407] * 70])
    x, z = torch.randn(2, 4, 8, 8, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    t = torch.tensor([999, 1])
    with torch.no_grad():
        ctx = te(ids)
        assert_close(ctx, pipe.text_encoder(ids).last_hidden_state, atol=1e-5, rtol=1e-5)
        ctx2 = ctx.expand(2, -1, -1)
        assert_close(unet(x, t, ctx2), pipe.unet(x, t, ctx2).sample, atol=1e-4, rtol=1e-4)
        assert_close(vae.decode(z), pipe.vae.decode(z).sample, atol=1e-4, rtol=1e-4)


def test_our_reader_gives_back_what_we_wrote(tiny):
    path, (te, unet, vae), _ = tiny
    ck = checkpoint.read(path)
    assert ck.family == "sd1" and ck.format == "safetensors"
    te2, unet2, vae2 = weights.build(ck)
    for a, b in ((te, te2), (unet, unet2), (vae, vae2)):
        _assert_same_tensors(a.state_dict(), b.state_dict(), type(a).__name__)


def test_diffusers_folder_reads_to_the_same_tensors_as_the_single_file(tiny, tmp_path):
    path, _, pipe = tiny
    pipe.save_pretrained(tmp_path / "folder")
    single, folder = checkpoint.read(path), checkpoint.read(tmp_path / "folder")
    assert folder.format == "diffusers" and folder.family == single.family
    for stage in ("unet", "vae", "text_encoder"):
        _assert_same_tensors(getattr(single, stage), getattr(folder, stage), stage)


def test_writing_never_overwrites(tiny):
    path, (te, unet, vae), _ = tiny
    before = path.read_bytes()[:4096]
    with pytest.raises(FileExistsError, match="not overwritten"):
        weights.write_single_file(path, te, unet, vae)
    assert path.read_bytes()[:4096] == before


@pytest.mark.full
def test_full_size_fp16_single_file_round_trip(tmp_path):
    """The real SD 1.x architecture: 686 + 248 + 196 tensors, all found by diffusers' converter."""
    te, unet, vae, configs = weights.random_models("full", seed=1)
    path = weights.write_single_file(tmp_path / "sd15-random-fp16.safetensors", te, unet, vae,
                                     dtype=torch.float16)
    ck = checkpoint.read(path)
    assert ck.family == "sd1" and ck.dtype == torch.float16
    counts = {s: len(getattr(ck, s)) for s in ("unet", "vae", "text_encoder")}
    assert counts == {"unet": 686, "vae": 248, "text_encoder": 196}
    pipe = ref_sd.load_with_diffusers(path, configs, tmp_path / "config")
    theirs = _diffusers_as_ours(pipe)
    for stage in ("unet", "vae", "text_encoder"):
        _assert_same_tensors({k: v.float() for k, v in getattr(ck, stage).items()},
                             {k: v.float() for k, v in theirs[stage].items()}, stage)
