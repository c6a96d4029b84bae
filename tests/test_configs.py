"""A checkpoint's configs (ldm/checkpoint/configs.py): the ldm.configs metadata, else read from the tensors.

A file without ldm's metadata (written by another converter, tiny or slimmed) gets each stage's
config from its tensor shapes and key names; a real SD 1.x / 2.x file gets exactly its family's
configs; counts read from a hostile file's key names are bounded; and ldm.checkpoint never imports
ldm.weights (the reader and the writer of the metadata sit side by side in ldm/checkpoint/).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import ldm
from bounded import run_bounded
from ldm import checkpoint, families, weights
from ldm.checkpoint import Checkpoint
from ldm.checkpoint import configs as ck_configs
from ldm.checkpoint.configs import MAX_BLOCKS, configs_for, from_tensors
from ldm.clip import CLIPTextConfig
from ldm.openclip import OpenCLIPTextConfig
from ldm.unet import UNetConfig, UNetModel
from ldm.vae import VAEConfig

ROOT = Path(__file__).resolve().parents[1]
# What no tensor's shape tells: the head split and the VAE's group count (the docstring's rule picks them).
SPLIT_FIELDS = {"num_heads", "num_head_channels", "num_attention_heads", "heads", "norm_groups"}


def _strip(src: Path, dst: Path, edit=None) -> Path:
    """`src` rewritten to `dst` without the ldm.configs metadata, as another converter would write it;
    `edit(tensors)` may change the tensors first."""
    meta = checkpoint.safetensors_metadata(src)
    del meta[weights.CONFIG_METADATA_KEY]
    tensors = load_file(str(src))
    if edit is not None:
        edit(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _write(path: Path, family: str, configs: dict, seed: int = 0) -> Path:
    """A random-weight file of `family` at `configs`, with its configs in the metadata (as random_models builds)."""
    fam = families.get(family)
    models = []
    for i, stage in enumerate(("text_encoder", "unet", "vae")):
        with torch.device("meta"):
            module = fam.models[stage](configs[stage])
        models.append(weights.random_init_(module.to_empty(device="cpu"), seed + i).eval())
    return weights.write_single_file(path, *models, configs=configs, family=fam, random_weights=True)


# ---- (a) full-size shapes give the family's configs ---------------------------------------------
@functools.lru_cache(maxsize=None)
def _meta_state(cls, config) -> dict:
    """A full-size module's tensors on the meta device: their shapes and names, no memory."""
    with torch.device("meta"):
        return cls(config).state_dict()


@pytest.mark.parametrize("family", [f.name for f in families.supported()])
def test_full_size_shapes_give_exactly_the_familys_configs(family):
    fam = families.get(family)
    stages = {stage: _meta_state(fam.models[stage], fam.configs[stage]) for stage in fam.stage_names}
    ck = Checkpoint(None, "state_dict", family, stages)
    assert from_tensors(ck) == dict(fam.configs)
    assert configs_for(ck) == dict(fam.configs)  # no metadata: the tensors


# ---- (b) tiny files without the metadata ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for family in ("sd1", "sd2"):
        stored = weights.random_checkpoint(root / f"{family}.safetensors", family=family)
        out[family] = stored, _strip(stored, root / f"{family}-no-configs.safetensors")
    return out


# the split each tiny config gets by the rule: SD 1.x's 8 heads fit widths 32/64; SD 2.x's 64-channel
# heads do not, so 32; one text head of the whole width (32, 48); 8 groups for the VAE's widths 8/16
TINY_SPLITS = {"sd1": {"unet": {"num_heads": 8}, "text_encoder": {"num_attention_heads": 1}, "vae": {"norm_groups": 8}},
               "sd2": {"unet": {"num_head_channels": 32}, "text_encoder": {"heads": 1}, "vae": {"norm_groups": 8}}}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_a_tiny_file_without_configs_metadata_loads_and_generates(tiny, family):
    stored_path, path = tiny[family]
    pipe = ldm.load(path, device="cpu")
    assert pipe.family.name == family
    res = pipe.generate("a red circle", steps=2, seed=1, height=64, width=64, progress=False)
    assert res.images[0].size == (64, 64) and torch.isfinite(res.latents).all()

    derived, stored = configs_for(checkpoint.read(path)), configs_for(checkpoint.read(stored_path))
    for stage, config in stored.items():
        for f in dataclasses.fields(config):
            if f.name not in SPLIT_FIELDS:
                assert getattr(derived[stage], f.name) == getattr(config, f.name), (stage, f.name)
        for name, value in TINY_SPLITS[family][stage].items():
            assert getattr(derived[stage], name) == value, (stage, name)
    assert stored["unet"] == weights.tiny_configs(family)["unet"]  # the metadata still wins where it is


DERIVABLE = {  # tiny configs whose head split and groups are the rule's: the tensors say everything
    "sd1": {"text_encoder": CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=1),
            "unet": UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                               context_dim=64),
            "vae": VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)},
    "sd2": {"text_encoder": OpenCLIPTextConfig(width=64, layers=2, heads=1, embed_dim=24),
            "unet": UNetConfig.sd2(model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                                   attention_resolutions=(1,), context_dim=64),
            "vae": VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)},
}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_derived_configs_give_the_metadata_pipelines_outputs_when_the_split_agrees(tmp_path, family):
    stored = _write(tmp_path / "stored.safetensors", family, DERIVABLE[family])
    path = _strip(stored, tmp_path / "no-configs.safetensors")
    assert configs_for(checkpoint.read(path)) == DERIVABLE[family] == configs_for(checkpoint.read(stored))
    a, b = (ldm.load(p, device="cpu").generate("a dog", steps=2, seed=3, height=64, width=64, progress=False)
            for p in (stored, path))
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)  # one process: bit for bit
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


# ---- (c) a slimmed file: other counts, depths and levels ----------------------------------------
SLIMMED = {
    "sd1": {**DERIVABLE["sd1"], "unet": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                                                   transformer_depth=2, attention_resolutions=(4, 2), context_dim=64)},
    "sd2": {**DERIVABLE["sd2"], "unet": UNetConfig.sd2(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                                                       transformer_depth=2, attention_resolutions=(4, 2),
                                                       context_dim=64)},
}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_a_slimmed_file_without_configs_metadata_loads_strictly(tmp_path, family):
    path = _strip(_write(tmp_path / "slim.safetensors", family, SLIMMED[family]), tmp_path / "slim-bare.safetensors")
    text_encoder, unet, vae = weights.build(checkpoint.read(path))  # strict loading inside
    assert (unet.cfg, vae.cfg, text_encoder.config) == tuple(SLIMMED[family][s] for s in ("unet", "vae",
                                                                                          "text_encoder"))
    x = torch.zeros(1, 4, 8, 8)
    assert unet(x, 999, torch.zeros(1, 3, 64)).shape == x.shape


def test_transformer_depths_that_differ_are_refused_in_one_line(tmp_path):
    stored = _write(tmp_path / "slim.safetensors", "sd1", SLIMMED["sd1"])
    middle = "model.diffusion_model.middle_block.1.transformer_blocks.1."
    path = _strip(stored, tmp_path / "mixed.safetensors",
                  lambda sd: [sd.pop(k) for k in [k for k in sd if k.startswith(middle)]])
    with pytest.raises(checkpoint.CheckpointError) as err:
        weights.build(checkpoint.read(path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "[1, 2] transformer blocks" in message, message
    assert "middle_block.1: 1" in message and "transformer_depth" in message, message


# ---- (c') SDXL: a transformer depth per level -----------------------------------------------------
def test_sdxl_unet_config_has_a_transformer_depth_per_level():
    xl = UNetConfig.sdxl()
    assert (xl.channel_mult, xl.attention_resolutions, xl.depths(), xl.num_head_channels, xl.context_dim,
            xl.adm_in_channels, xl.use_linear_in_transformer, xl.sample_size) == \
        ((1, 2, 4), (4, 2), (1, 2, 10), 64, 2048, 2816, True, 128)
    assert UNetConfig().depths() == (1, 1, 1, 1) and UNetConfig(transformer_depth=3).depths() == (3,) * 4
    for bad in [(1, 2), (1, 0, 2), [1, 2, 10], 0, (1, 2.0, 3)]:
        with pytest.raises(ValueError, match=r"^UNetConfig: transformer_depth=.* must be an integer >= 1 or a tuple "
                                             r"of one per level \(len\(channel_mult\)=3\), each >= 1$"):
            UNetConfig.sdxl(transformer_depth=bad)


def _unet_read_back(unet_config: UNetConfig, family: UNetConfig = UNetConfig.sdxl()) -> UNetConfig:
    """The UNetConfig from_tensors' reader gives for a (meta) UNet's state dict, `family` the SDXL record."""
    where = "test: configs read from the tensors"
    values = ck_configs._unet(ck_configs._Tensors(_meta_state(UNetModel, unet_config), where, "unet"), family)
    return ck_configs._config_from_dict(UNetConfig, values, where)


def test_sdxl_shaped_unets_read_back_their_configs_from_the_tensors():
    assert _unet_read_back(UNetConfig.sdxl()) == UNetConfig.sdxl()                 # (1, 2, 10): level 0's reads 1
    tiny_xl = UNetConfig.tiny_sdxl()                # heads 16 wide: no shape says it (gcd(32, 64) = 32); sample size: the record's
    assert _unet_read_back(tiny_xl) == dataclasses.replace(tiny_xl, num_head_channels=32, sample_size=128)
    assert _unet_read_back(dataclasses.replace(tiny_xl, transformer_depth=(5, 2, 2))).transformer_depth == 2  # equal
    sd1 = dataclasses.replace(UNetConfig(), transformer_depth=(1, 1, 1, 2))   # level 3 without attention: the middle's
    assert _unet_read_back(sd1, UNetConfig()) == sd1


def test_a_per_level_transformer_depth_in_the_metadata_is_read_bounded_and_checked(tmp_path):
    fam = families.get("sd2")
    stages = {stage: _meta_state(fam.models[stage], fam.configs[stage]) for stage in ("text_encoder", "vae")}
    ck = Checkpoint(tmp_path / "xl.safetensors", "safetensors", "sd2",
                    {**stages, "unet": _meta_state(UNetModel, UNetConfig.tiny_sdxl())})
    good = {**fam.configs, "unet": UNetConfig.tiny_sdxl()}
    assert ck_configs.from_metadata(ck, ck_configs.configs_metadata(good)) == good      # a JSON list reads as the tuple
    for depth, message in [([1, 1, 3], r"transformer_depth \(the deepest\) gives 3, but the file's tensors have 2"),
                           ([1, 1], r"ValueError: UNetConfig: transformer_depth=\(1, 1\) must be"),
                           ([1] * 17, "allowed: an integer from 1 to 1048576, or a list of at most 16 integers"),
                           ([1, 0, 2], "allowed: an integer from 1 to"), ("2", "allowed: an integer from 1 to")]:
        text = json.loads(ck_configs.configs_metadata(good))
        text["unet"]["transformer_depth"] = depth
        with pytest.raises(checkpoint.CheckpointError, match=message):
            ck_configs.from_metadata(ck, json.dumps(text))


# ---- (d) hostile key names -----------------------------------------------------------------------
HOSTILE = {  # key -> what the file's names claim
    "model.diffusion_model.input_blocks.1000000.0.in_layers.0.weight": "10**6 input blocks",
    "cond_stage_model.transformer.text_model.encoder.layers.1000000.mlp.fc1.weight": "10**6 text layers",
    "model.diffusion_model.input_blocks.999999.0.in_layers.0.weight": "input blocks with a gap",
    "model.diffusion_model.middle_block.1.transformer_blocks." + "9" * 5000 + ".norm1.weight": "a 5000-digit index",
    "first_stage_model.encoder.down.0.block.99999.conv1.weight": "10**5 VAE blocks",
}


@pytest.mark.parametrize("key", HOSTILE, ids=list(HOSTILE.values()))
def test_counts_from_a_hostile_files_key_names_are_bounded(tmp_path, tiny, key):
    path = _strip(tiny["sd1"][0], tmp_path / "hostile.safetensors", lambda sd: sd.update({key: torch.zeros(1)}))
    out = run_bounded(lambda: weights.build(checkpoint.read(path)))
    assert out["error"] == "CheckpointError", out
    assert "\n" not in out["message"] and str(path) in out["message"] and len(out["message"]) < 1000, out
    assert out["seconds"] < 10, out


def test_more_layers_than_the_bound_are_refused(tmp_path, tiny):
    """Layers numbered 0 .. MAX_BLOCKS in a row, each a real (tiny) tensor: a count, not a gap, says no."""
    extra = {f"cond_stage_model.transformer.text_model.encoder.layers.{i}.mlp.fc1.weight": torch.zeros(1)
             for i in range(2, MAX_BLOCKS + 1)}
    path = _strip(tiny["sd1"][0], tmp_path / "many.safetensors", lambda sd: sd.update(extra))
    expected = rf"\({MAX_BLOCKS + 1} distinct N\); allowed: at most {MAX_BLOCKS}"
    with pytest.raises(checkpoint.CheckpointError, match=expected):
        weights.build(checkpoint.read(path))


# ---- (e) no import circle between ldm.checkpoint and ldm.weights -------------------------------
def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The ldm modules `path` imports anywhere in it (module level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package, `level - 1` packages up
                package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
                package = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{package}.{base}" if base else package
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from ldm import weights` names a module
    return {m for m in found if m in modules}


def test_ldm_checkpoint_never_imports_ldm_weights():
    files = {}
    for path in [*ROOT.glob("ldm/*.py"), *ROOT.glob("ldm/checkpoint/*.py"), *ROOT.glob("ldm/samplers/*.py")]:
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {m: _imports(p, m, set(files)) for m, p in files.items()}
    assert "ldm.checkpoint.configs" in graph and "ldm.checkpoint" in graph["ldm.weights"]
    for start in [m for m in graph if m == "ldm.checkpoint" or m.startswith("ldm.checkpoint.")]:
        seen, todo = {start}, [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert "ldm.weights" not in seen, f"{start} reaches ldm.weights: an import circle with ldm.weights"
