"""The family records (ldm.families) and what reads them: detection, building, the pipeline, the CLI.

Checked: every record is consistent (its configs build, its downloads have sizes and hashes); a
new family is one entry (a record for an 8-channel UNet makes such a file readable and buildable,
and its download listed); the prediction type flows from the file to the sampler (a diffusers
folder's scheduler config: prediction type, timestep spacing, steps offset, each honoured and
overridable, end to end against diffusers with v-prediction); a prediction-type override a family
does not allow, or one a sampler cannot take, is a one-line error naming the allowed values; every
option is checked before any work is done; and the promise that a family is data: a made-up family
with a fourth stage and an extra conditioning vector, defined here as one record plus its classes,
is written, read back strictly and generated through ldm.load with no other file changed.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import ldm
import ref_samplers
import ref_sd
from ldm import checkpoint, families, weights
from ldm.clip import CLIPTextConfig, CLIPTextModel
from ldm.conditioning import Conditioning
from ldm.tokenizer import CLIPTokenizer
from ldm.unet import UNetConfig, UNetModel
from ldm.vae import AutoencoderKL, VAEConfig

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")


def test_every_record_is_consistent():
    for name, fam in families.FAMILIES.items():
        assert fam.name == name and str(fam) == name
        assert fam.stage_names == (families.STAGES if not name.startswith("sdxl") else
                                   ("text_encoder", "text_encoder_2", "unet", "vae") if fam.supported else families.STAGES)
        assert fam.prediction_type in fam.prediction_types
        for d in fam.downloads:
            assert d.size > 10**9 and len(d.sha256) == 64 and int(d.sha256, 16) >= 0 and d.repo.count("/") == 1
        if fam.supported:
            for stage, cls in fam.models.items():
                with torch.device("meta"):
                    cls(fam.configs[stage])  # the record's configs build its networks
            assert fam.preview_factors().shape == (fam.configs["vae"].embed_dim, 3)
    sd1, inpaint = families.get("sd1"), families.get("sd1-inpaint")
    assert (sd1.default_size, sd1.scaling_factor, sd1.prediction_type) == (512, 0.18215, "epsilon")
    assert inpaint.configs["unet"].in_channels == inpaint.unet_in_channels == 9
    assert [f.name for f in families.supported()] == ["sd1", "sd1-inpaint", "sd2", "sd2-v", "sdxl"]
    xl = families.get("sdxl")
    assert (xl.default_size, xl.scaling_factor, xl.spacing, xl.schedule().steps_offset) == (1024, 0.13025, "leading", 1)
    assert xl.configs["unet"].context_dim == xl.configs["text_encoder"].hidden_size + xl.configs["text_encoder_2"].width
    assert xl.configs["unet"].adm_in_channels == xl.configs["text_encoder_2"].embed_dim + 6 * 256 == 2816
    tiny = xl.tiny_configs
    assert tiny["unet"].adm_in_channels == tiny["text_encoder_2"].embed_dim + 6 * 8
    assert tiny["unet"].context_dim == tiny["text_encoder"].hidden_size + tiny["text_encoder_2"].width
    assert not families.get("sdxl-refiner").supported
    base, v = families.get("sd2"), families.get("sd2-v")  # one network, two predictions and sizes
    assert (v.prediction_type, v.default_size, v.prefixes["text_encoder"]) == ("v_prediction", 768, "cond_stage_model.model.")
    assert (base.prediction_type, base.default_size) == ("epsilon", 512)
    assert {k: c for k, c in base.configs.items() if k != "unet"} == {k: c for k, c in v.configs.items() if k != "unet"}
    assert dataclasses.replace(base.configs["unet"], sample_size=96) == v.configs["unet"]
    assert set(families.downloads()) == {"sd-v1-5", "sd-v1-4", "sd-v1-5-inpainting", "sd-v2-1-base", "sd-v2-1"}
    slot = dataclasses.replace(v, name="sd2-slot", stages=tuple(  # a slot: recognised, not built
        families.Stage(st.name, st.prefix) for st in v.stages))
    assert not slot.supported and slot.default_size is None and "not supported yet" in repr(slot)
    with pytest.raises(ValueError, match=r"^family='sd3' is unknown; valid: sd1, sd1-inpaint, sd2, sd2-v, sdxl, sdxl-refiner$"):
        families.get("sd3")


def _eight_channel_file(path):
    """A tiny SD 1.x-layout file whose UNet takes 8 input channels (as InstructPix2Pix's does)."""
    te, unet, vae, configs = weights.random_models("tiny")
    configs["unet"] = dataclasses.replace(configs["unet"], in_channels=8)
    with torch.device("meta"):
        unet = families.get("sd1").models["unet"](configs["unet"])
    unet = weights.random_init_(unet.to_empty(device="cpu"))
    return weights.write_single_file(path, te, unet, vae, configs=configs)


def test_a_new_family_is_one_entry(tmp_path, monkeypatch):
    path = _eight_channel_file(tmp_path / "eight.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="InstructPix2Pix-style UNet with 8 input channels"):
        checkpoint.read(path)
    sd1 = families.get("sd1")
    new = dataclasses.replace(  # the one entry: its name, detection trait, configs, download
        sd1, name="sd1-8ch", title="SD 1.x with 8 input channels", looks_like="an 8-channel SD 1.x checkpoint",
        unet_in_channels=8, stages=families.sd_stages(sd1.prefixes, {**sd1.configs, "unet": UNetConfig(in_channels=8)},
                                                      sd1.models, sd1.stage("text_encoder").tokenizer),
        downloads=(families.Download("eight", "someone/eight", "eight.safetensors", 2 * 10**9, "0" * 64),))
    monkeypatch.setitem(families.FAMILIES, new.name, new)
    ck = checkpoint.read(path)
    assert ck.family == "sd1-8ch" and ck.record is new
    _, unet, _ = weights.build(ck)
    assert unet.cfg.in_channels == 8
    assert "eight" in families.downloads() and "SD 1.x with 8 input channels" in checkpoint.errors.supported_text()


def test_prediction_type_overrides_are_checked(tmp_path, capsys):
    path = weights.random_checkpoint(tmp_path / "m.safetensors")
    allowed = r"is not a choice for the sd1 family \(SD 1.x\); allowed: epsilon$"
    for bad in ("v_prediction", "x0"):
        with pytest.raises(ValueError, match=rf"^prediction_type='{bad}' {allowed}"):
            ldm.load(path, device="cpu", prediction_type=bad)
    pipe = ldm.load(path, device="cpu", prediction_type="epsilon")
    assert pipe.prediction_type == "epsilon" and pipe.family is families.get("sd1")
    with pytest.raises(ValueError, match=rf"^prediction_type='v_prediction' {allowed}"):
        pipe.generate("a dog", prediction_type="v_prediction", progress=False)
    from ldm import cli
    assert cli.main(["generate", "a dog", "--checkpoint", str(path), "--prediction-type", "v_prediction",
                     "--out", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "allowed: epsilon" in err
    assert cli.main(["generate", "a dog", "--prediction-type", "x0"]) == 2  # argparse: a usage error
    assert "invalid choice: 'x0'" in capsys.readouterr().err


def test_every_option_is_checked_before_any_work(tmp_path):
    pipe = ldm.load(weights.random_checkpoint(tmp_path / "m.safetensors"), device="cpu")
    calls = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        for kwargs, match in [
            (dict(scheduler="ddim", karras=True), r"karras=True is not available for 'ddim'"),
            (dict(scheduler="euler", eta=0.3), r"eta=0.3 only applies to 'ddim', not 'euler'"),
            (dict(spacing="uniform"), r"spacing='uniform' is unknown; valid: leading, trailing, linspace"),
            (dict(scheduler="lcm", steps=60), r"steps=60 is not allowed for 'lcm'"),
            (dict(tile="yes"), r"tile='yes' must be None \(automatic\), True or False"),
            (dict(seed=[1, 2]), r"seed=\[1, 2\]: a list needs one int per image \(1\)"),
            (dict(negative_prompt=["a", "b"]), r"negative_prompt has 2 entries for 1 prompts"),
            (dict(clip_skip=5), r"clip_skip=5 must be an int in \[1, 2\]"),
        ]:
            with pytest.raises(ValueError, match=match):
                pipe.generate("a dog", progress=False, **kwargs)
        with pytest.raises(TypeError, match=r"unexpected keyword argument 'stepz'; allowed: .*steps"):
            pipe.generate("a dog", stepz=3)
    finally:
        hook.remove()
    assert calls == []  # nothing was encoded: every check ran first


@pytest.fixture(scope="module")
def v_folder(tmp_path_factory):
    """A tiny SD 1.x model saved as a diffusers folder whose scheduler config says v-prediction, trailing
    spacing, steps_offset 0; the diffusers pipeline on the same weights; and the tiny configs (ldm builds a
    folder with its family's configs, SD 1.x's full size: `tiny_configs` stands in for them)."""
    root = tmp_path_factory.mktemp("vpred")
    path = weights.random_checkpoint(root / "m.safetensors", seed=5)
    configs = weights.configs_for(checkpoint.read(path))
    base = ref_sd.load_with_diffusers(path, configs, root / "config")
    folder = root / "folder"
    base.save_pretrained(folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0)
    config_file.write_text(json.dumps(config))
    return folder, base, configs


@pytest.fixture
def tiny_configs(v_folder, monkeypatch):
    monkeypatch.setattr(weights, "configs_for", lambda ck: v_folder[2])


def test_a_diffusers_folders_scheduler_config_flows_to_the_sampler(v_folder, tiny_configs):
    folder, base, _ = v_folder
    ck = checkpoint.read(folder)
    assert ck.scheduler == {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "steps_offset": 0}
    assert (ck.prediction_type, ck.prediction_reason) == ("v_prediction", "scheduler/scheduler_config.json says so")
    pipe = ldm.load(folder, device="cpu")
    assert (pipe.prediction_type, pipe.spacing, pipe.schedule.steps_offset) == ("v_prediction", "trailing", 0)
    # end to end against diffusers, the same settings in its scheduler
    steps = []
    res = pipe.generate("a dog", steps=4, seed=3, height=64, width=64, progress=False,
                        callback=lambda i, x, x0: steps.append(x.clone()))
    ref = ref_sd.as_pipeline(base, "txt2img", "euler")
    ref.scheduler = ref_samplers.make_scheduler("euler", spacing="trailing", prediction_type="v_prediction",
                                                steps_offset=0)
    ref_images, ref_steps = ref_sd.run_diffusers(ref, ["a dog"], res.seeds, num_inference_steps=4,
                                                 guidance_scale=7.5, height=64, width=64)
    for i, (a, b) in enumerate(zip(steps, ref_steps, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-4 * max(1.0, b.abs().max().item()), rtol=1e-4, msg=lambda m: f"step {i}: {m}")
    assert np.abs(np.asarray(res.images[0]).astype(int) - ref_images[0].astype(int)).max() <= 1


def test_the_folders_settings_are_overridable(v_folder, tiny_configs):
    folder, _, _ = v_folder
    pipe = ldm.load(folder, device="cpu", prediction_type="epsilon")  # the sd1 family allows epsilon
    assert pipe.prediction_type == "epsilon"
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(float(args[1].flatten()[0])))
    try:
        pipe.generate("a dog", scheduler="ddim", steps=4, guidance=1.0, height=64, width=64, progress=False,
                      spacing="leading")
    finally:
        hook.remove()
    assert seen == [750.0, 500.0, 250.0, 0.0]  # leading spacing with the folder's steps_offset 0
    with pytest.raises(ValueError, match=r"^prediction_type='sample' is not a choice for the sd1 family"):
        pipe.generate("a dog", prediction_type="sample", progress=False)


def test_a_bad_scheduler_config_is_one_line(v_folder, tmp_path):
    import shutil
    folder = shutil.copytree(v_folder[0], tmp_path / "bad")
    config_file = folder / "scheduler" / "scheduler_config.json"
    for key, value, allowed in (("prediction_type", "x0", "epsilon, v_prediction, sample"),
                                ("timestep_spacing", "uniform", "leading, trailing, linspace"),
                                ("steps_offset", -1, "an integer from 0 to 999")):
        config = json.loads(v_folder[0].joinpath("scheduler", "scheduler_config.json").read_text())
        config_file.write_text(json.dumps({**config, key: value}))
        with pytest.raises(checkpoint.CheckpointError) as err:
            checkpoint.read(folder)
        assert str(err.value) == f"{config_file}: {key}={value!r}; allowed: {allowed}"


# ---- a family is data: a made-up family with a fourth stage and a conditioning vector -----------------
@dataclasses.dataclass(frozen=True)
class PoolerConfig:
    width: int = 32     # the text tower's width
    out: int = 8        # the vector the UNet takes (its adm_in_channels)


class Pooler(torch.nn.Module):
    """The made-up family's fourth stage: the prompt's context, averaged over its tokens, to a vector."""

    def __init__(self, cfg: PoolerConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = torch.nn.Linear(cfg.width, cfg.out)

    def forward(self, context: torch.Tensor) -> torch.Tensor:  # (B, T, width) -> (B, out)
        return self.proj(context.mean(1))


class PooledVector:
    """Its conditioner: the text tower's context, and the pooler's vector as y."""

    def __call__(self, pipe, prompts, opts) -> Conditioning:  # opts: ldm.options.Options; None: no text
        texts = ["" if p is None else p for p in prompts]
        context = pipe.encode_prompt(texts, clip_skip=opts.clip_skip, prompt_syntax=opts.prompt_syntax)
        return Conditioning(context, pipe.pooler(context.to(pipe.pooler.proj.weight.dtype)))


def _toy_family() -> families.Family:
    """One record: four stages (name, key prefix, config, class), its conditioner, its traits."""
    configs = {"text_encoder": CLIPTextConfig.tiny(), "pooler": PoolerConfig(),
               "unet": dataclasses.replace(UNetConfig.tiny(), adm_in_channels=8), "vae": VAEConfig.tiny()}
    stages = (families.Stage("text_encoder", "cond_stage_model.transformer.", configs["text_encoder"], CLIPTextModel,
                             CLIPTokenizer),
              families.Stage("pooler", "cond_stage_model.pooler.", configs["pooler"], Pooler),
              families.Stage("unet", "model.diffusion_model.", configs["unet"], UNetModel),
              families.Stage("vae", "first_stage_model.", configs["vae"], AutoencoderKL))
    return families.Family("toy", "a made-up family", "a made-up checkpoint", stages=stages, unet_in_channels=4,
                           linear_proj=False, text_width_key="text_model.embeddings.token_embedding.weight",
                           conditioner=PooledVector, tiny_configs=configs)


def test_a_family_with_a_fourth_stage_and_a_vector_is_one_record(tmp_path, monkeypatch):
    toy = _toy_family()
    monkeypatch.setitem(families.FAMILIES, toy.name, toy)
    path = weights.random_checkpoint(tmp_path / "toy.safetensors", family="toy", seed=3)
    ck = checkpoint.read(path)
    assert ck.family == "toy" and list(ck.stages()) == ["text_encoder", "pooler", "unet", "vae"]
    assert set(ck.pooler) == {"proj.weight", "proj.bias"} and "label_emb.0.0.weight" in ck.unet
    nets = weights.build_stages(ck)  # strict loading of every stage, the fourth included
    models, _ = weights.random_stages("tiny", seed=3, family="toy")
    for stage, net in nets.items():
        for k, v in net.state_dict().items():
            torch.testing.assert_close(v, models[stage].state_dict()[k], rtol=0, atol=0)

    pipe = ldm.load(path, device="cpu")
    assert pipe.family is toy and isinstance(pipe.pooler, Pooler) and pipe.unet.cfg.adm_in_channels == 8
    kw = dict(steps=2, height=32, width=32, seed=0, progress=False)
    first = pipe.generate("a red circle", negative_prompt="blue", **kw)
    again = pipe.generate("a red circle", negative_prompt="blue", **kw)
    torch.testing.assert_close(first.latents, again.latents, rtol=0, atol=0)
    cond = pipe.condition(["a red circle", "blue"])
    assert cond.context.shape == (2, 77, 32) and cond.y.shape == (2, 8)
    with torch.no_grad():                        # the vector reaches the UNet: change it, the image changes
        pipe.pooler.proj.bias.add_(1.0)
    moved = pipe.generate("a red circle", negative_prompt="blue", **kw)
    assert (moved.latents - first.latents).abs().max() > 1e-3
    unguided = pipe.generate("a red circle", guidance=1.0, **kw)   # one branch: no unconditional pass
    assert unguided.latents.shape == first.latents.shape
    with pytest.raises(ValueError, match=r"UNetModel: y must be \(B=1, 8\), got None"):
        pipe.unet(torch.zeros(1, 4, 4, 4), 10, cond.context[:1])
