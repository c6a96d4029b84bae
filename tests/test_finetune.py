"""ldm.finetune: a few LoRA steps on a tiny random model make the loss fall, the kohya file it writes
reads back through ldm.lora unchanged (merged output equals hooked output), an existing output is
refused and left intact, and bad options are one-line errors."""
import copy

import pytest
import torch
from safetensors.torch import load_file

from ldm import finetune, lora, shapes, weights
from ldm.pipeline import Pipeline
from ldm.tokenizer import CLIPTokenizer

# A micro recipe on the tiny random checkpoint (widths 32/64): a dozen steps take seconds.
MICRO = ["--steps", "12", "--images", "6", "--batch", "4", "--invert-steps", "2", "--pool-size", "8",
         "--lr", "3e-2", "--warmup", "0", "--log-every", "1", "--rank", "4", "--alpha", "2", "--threads", "1"]


def tiny() -> Pipeline:
    """The tiny random networks (widths 32/64, the world's 64 x 64 images, 8 x 8 latents) as a Pipeline."""
    te, unet, vae, _ = weights.random_models("tiny", seed=0)
    return Pipeline({"text_encoder": te, "unet": unet, "vae": vae}, name="tiny-random")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "orange.safetensors"
    result = finetune.main(["--out", str(out), *MICRO], pipe=tiny())
    return out, result


def test_loss_falls(trained):
    _, result = trained
    assert result["loss_after"]["new"] < 0.9 * result["loss_before"]["new"], result
    assert result["modules"] > 0 and len(result["history"]) == 12


def test_file_is_kohya_and_round_trips(trained):
    out, result = trained
    sd = load_file(out)
    assert all(k.startswith(("lora_unet_", "lora_te_")) and
               k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in sd)
    lo = lora.read(out)
    assert lo.format == "kohya" and lo.num_modules == result["modules"] and lo.ranks == {4}
    assert {layer.alpha for layers in lo.layers.values() for layer in layers.values()} == {2.0}
    assert any(layer.up.abs().max() > 0 for layer in lo.layers["unet"].values())  # training moved up
    te_names = set(lo.layers["text_encoder"])
    assert {"text_model_encoder_layers_0_self_attn_q_proj", "text_model_encoder_layers_1_mlp_fc2"} <= te_names
    assert any(n.endswith("attn2_to_k") for n in lo.layers["unet"])

    pipe = tiny()  # the same random weights the LoRA was trained on
    te, unet = pipe.text_encoder, pipe.unet
    resolved = lo.resolve({"unet": unet, "text_encoder": te})  # strict: every name finds its module
    assert sum(len(v) for v in resolved.values()) == lo.num_modules
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900.0, 100.0])
    ids = CLIPTokenizer()(["an orange circle", "a red square"])

    def run(te, unet):
        with torch.no_grad():
            return te(ids), unet(x, t, te(ids))

    base = run(te, unet)
    te2, unet2 = copy.deepcopy(te), copy.deepcopy(unet)
    with lora.apply({"text_encoder": te, "unet": unet}, [(out, 1.0)], merge=True):
        merged = run(te, unet)
    with lora.apply({"text_encoder": te2, "unet": unet2}, [(out, 1.0)], merge=False):
        hooked = run(te2, unet2)
    for m, h, b in zip(merged, hooked, base):
        torch.testing.assert_close(m, h, atol=1e-5, rtol=1e-4)
        assert (m - b).abs().max() > 1e-4  # the LoRA changes what the model computes
    torch.testing.assert_close(run(te, unet)[1], base[1], atol=0, rtol=0)  # unmerged: the base again


def test_state_dict_round_trip_is_exact():
    """init_lora -> lora_state_dict -> lora.from_state_dict gives back the same tensors, names and alphas."""
    pipe = tiny()
    cfg = finetune.FinetuneConfig(out="x.safetensors", rank=3, alpha=6.0, convs=True)
    lo = finetune.init_lora(pipe.text_encoder, pipe.unet, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in finetune.parameters(lo):
            p.normal_()
    back = lora.from_state_dict(finetune.lora_state_dict(lo))
    assert back.layers.keys() == lo.layers.keys()
    for stage in lo.layers:
        assert back.layers[stage].keys() == lo.layers[stage].keys()
        for name, layer in lo.layers[stage].items():
            other = back.layers[stage][name]
            assert torch.equal(other.down, layer.down.detach()) and torch.equal(other.up, layer.up.detach())
            assert other.alpha == 6.0
    assert any("in_layers_2" in n for n in lo.layers["unet"])  # --convs adds the ResBlock convs
    assert all(len(v) == len(lo.resolve({"unet": pipe.unet, "text_encoder": pipe.text_encoder})[k])
               for k, v in lo.layers.items())


def test_existing_output_is_refused_and_left_intact(tmp_path, capsys):
    out = tmp_path / "taken.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as e:
        finetune.main(["--out", str(out), *MICRO])
    assert "already exists" in str(e.value.code) and "\n" not in str(e.value.code)
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("args, words", [
    (["--rank", "0"], "--rank 0 must be >= 1"),
    (["--steps", "-1"], "--steps -1 must be >= 1"),
    (["--lr", "0"], "--lr 0.0 must be > 0"),
    (["--prior", "1"], "--prior 1.0 must be in [0, 1)"),
    (["--color", "red=255,0,0"], "--color 'red'"),
    (["--color", "orange=300,0,0"], "three integers in 0-255"),
    (["--color", "orange"], "expected NAME=R,G,B"),
    (["--rank", "two"], "invalid int value"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_options_are_one_line(tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as e:
        finetune.main(["--out", str(tmp_path / "x.safetensors"), *args])
    message = str(e.value.code) if e.value.code != 2 else capsys.readouterr().err.strip()
    assert words in message and "\n" not in message, message
    assert not (tmp_path / "x.safetensors").exists()


def test_out_must_be_safetensors_and_given(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        finetune.main(["--out", str(tmp_path / "x.pt")])
    assert "ending in .safetensors" in str(e.value.code)
    with pytest.raises(SystemExit):
        finetune.main([])
    err = capsys.readouterr().err.strip()
    assert "--out" in err and "\n" not in err


def test_new_scenes_and_captions():
    cfg = finetune.FinetuneConfig(out="x.safetensors", images=9)
    scenes = finetune.new_scenes(cfg)
    assert [s.shapes[0].shape for s in scenes] == list(shapes.SHAPES) * 3
    assert all(len(s.shapes) == 1 and s.shapes[0].color == "orange" for s in scenes)
    assert finetune.article("a orange circle above a red square") == "an orange circle above a red square"
    assert finetune.article("a large orange shape") == "a large orange shape"
    spec = shapes.parse("an orange circle", cfg.extra_colors)
    assert spec.shapes[0].color == "orange" and spec.shapes[0].shape == "circle"
