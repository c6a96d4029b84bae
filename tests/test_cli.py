"""The `ldm` command: what a user types, what they see, and that failures are one line."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm import cli


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LDM_CHECKPOINT", raising=False)
    return tmp_path


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_random_checkpoint_then_info_then_encode(in_tmp, capsys):
    rc, out, _ = run(capsys, "random-checkpoint", "weights/random-tiny.safetensors")
    assert rc == 0 and "wrote weights/random-tiny.safetensors" in out
    rc, out, _ = run(capsys, "info", "weights/random-tiny.safetensors")
    assert rc == 0 and "family  sd1" in out and "safetensors" in out
    # encode finds the checkpoint in ./weights/ by itself
    rc, out, _ = run(capsys, "encode", "a dog wearing a hat")
    assert rc == 0
    assert "[49406, 320, 1929, 3309, 320, 3801, 49407] + 70 x 49407 (padding)" in out
    assert "context    (1, 77, 32) torch.float32" in out


def test_encode_output_is_the_text_encoders(in_tmp, capsys):
    from ldm import checkpoint, weights
    from ldm.tokenizer import CLIPTokenizer

    run(capsys, "random-checkpoint", "m.safetensors", "--seed", "5")
    rc, out, _ = run(capsys, "encode", "a red cube", "--checkpoint", "m.safetensors")
    te, _, _ = weights.build(checkpoint.read("m.safetensors"))
    with torch.no_grad():
        ctx = te(CLIPTokenizer()(["a red cube"]))
    assert f"mean {ctx.mean():.4f}, std {ctx.std():.4f}" in out


def test_no_checkpoint_says_how_to_get_one_in_one_line(in_tmp, capsys):
    rc, out, err = run(capsys, "encode", "a dog")
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("ldm: error: no checkpoint given")
    assert "weights/README.md" in err and "ldm random-checkpoint" in err


def test_never_overwrites(in_tmp, capsys):
    target = in_tmp / "precious.safetensors"
    target.write_bytes(b"the user's file")
    rc, _, err = run(capsys, "random-checkpoint", str(target))
    assert rc == 1 and "already exists; not overwritten" in err and err.count("\n") == 1
    assert target.read_bytes() == b"the user's file"


@pytest.mark.parametrize("content, expected", [
    (b"", "empty"),
    (b"not a checkpoint at all", "not a checkpoint"),
])
def test_bad_checkpoint_is_one_line(in_tmp, capsys, content, expected):
    (in_tmp / "bad.ckpt").write_bytes(content)
    rc, _, err = run(capsys, "info", "bad.ckpt")
    assert rc == 1 and expected in err and err.count("\n") == 1


def test_bad_choice_is_a_usage_error(in_tmp, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["random-checkpoint", "x.safetensors", "--size", "huge"])
    assert e.value.code == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err


# ---- generation verbs ------------------------------------------------------------------------
@pytest.fixture
def with_tiny(in_tmp, capsys):
    run(capsys, "random-checkpoint", "weights/random-tiny.safetensors")
    return in_tmp


def test_generate_writes_pngs_with_parameters_and_never_overwrites(with_tiny, capsys):
    from PIL import Image

    (with_tiny / "outputs").mkdir()
    (with_tiny / "outputs" / "00000-3.png").write_bytes(b"an older image")
    argv = ("generate", "a dog wearing a hat", "--size", "64x64", "--steps", "2", "--seed", "3",
            "--num-images", "2", "--negative", "blurry", "-q")
    rc, out, _ = run(capsys, *argv)
    assert rc == 0 and out.splitlines() == ["wrote outputs/00001-3.png (64x64, seed 3)",
                                            "wrote outputs/00002-4.png (64x64, seed 4)"]
    assert (with_tiny / "outputs" / "00000-3.png").read_bytes() == b"an older image"
    with Image.open(with_tiny / "outputs" / "00002-4.png") as im:
        assert im.text["parameters"] == ("a dog wearing a hat\nNegative prompt: blurry\nSteps: 2, Sampler: euler, "
                                         "CFG scale: 7.5, Seed: 4, Size: 64x64, Model: random-tiny, Mode: txt2img")
        first = np.asarray(im)
    rc, out, _ = run(capsys, *argv)  # same seed again: same image, new file
    assert rc == 0 and "00004-4.png" in out
    with Image.open(with_tiny / "outputs" / "00004-4.png") as im:
        np.testing.assert_array_equal(np.asarray(im), first)


def test_img2img_and_inpaint_verbs(with_tiny, capsys):
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save("in.png")
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    mask.save("mask.png")
    rc, out, err = run(capsys, "img2img", "a cat", "--image", "in.png", "--strength", "0.5", "--steps", "4",
                       "--seed", "1", "-q", "--out", "o")
    assert rc == 0 and out == "wrote o/00000-1.png (64x64, seed 1)\n", err
    rc, out, err = run(capsys, "inpaint", "a cat", "--image", "in.png", "--mask", "mask.png", "--steps", "2",
                       "--seed", "1", "-q", "--out", "o")
    assert rc == 0 and out == "wrote o/00001-1.png (64x64, seed 1)\n", err
    rc, _, err = run(capsys, "inpaint", "a cat", "--image", "in.png", "--mask", "in.png", "--size", "8x8", "-q")
    assert rc == 1 and err.count("\n") == 1 and "height=8 must be a multiple of 8 pixels" in err


@pytest.mark.parametrize("argv, expected", [
    (("generate", "a dog", "--size", "60x64"), "width=60 must be a multiple of 8 pixels"),
    (("generate", "a dog", "--steps", "0"), "steps=0 is not allowed"),
    (("generate", "a dog", "--guidance", "-2"), "guidance=-2.0 must be a finite number >= 0"),
    (("generate", "a dog", "--guidance", "nan"), "guidance=nan"),
    (("img2img", "a dog", "--image", "missing.png"), "--image missing.png: cannot read it as an image"),
    (("img2img", "a dog", "--image", "weights/random-tiny.safetensors"), "cannot read it as an image"),
])
def test_bad_generation_input_is_one_line(with_tiny, capsys, argv, expected):
    rc, out, err = run(capsys, *argv, "-q")
    assert rc == 1 and out == "" and err.count("\n") == 1 and expected in err, err


def test_unwritable_output_folder_fails_before_sampling(with_tiny, capsys):
    (with_tiny / "taken").write_text("a file where the folder should go")
    rc, _, err = run(capsys, "generate", "a dog", "--out", "taken/sub", "-q")
    assert rc == 1 and err.startswith("ldm: error: --out taken/sub: cannot write there") and err.count("\n") == 1
    assert (with_tiny / "taken").read_text() == "a file where the folder should go"


def test_generate_without_checkpoint_says_how_to_get_one(in_tmp, capsys):
    rc, out, err = run(capsys, "generate", "a dog")
    assert rc == 1 and err.count("\n") == 1 and "ldm random-checkpoint" in err


def test_long_prompt_is_a_one_line_warning(with_tiny, capsys):
    rc, _, err = run(capsys, "generate", "a dog " * 40 + "in a golden crown", "--size", "64x64", "--steps", "1",
                     "--guidance", "1", "-q", "--seed", "0")
    assert rc == 0 and err.startswith("ldm: warning: prompts[0] has") and "golden crown" in err
    assert err.count("\n") == 1


def test_download_checks_the_checksum_and_keeps_nothing_bad(in_tmp, capsys, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def fake_download(repo, filename, local_dir):
        path = Path(local_dir) / filename
        path.write_bytes(b"not the real weights")
        return str(path)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    rc, _, err = run(capsys, "download", "sd-v1-5")
    assert rc == 1 and "sha256" in err and "nothing was kept" in err and err.strip().count("\n") == 1
    assert list((in_tmp / "weights").iterdir()) == []
    monkeypatch.setitem(cli.DOWNLOADS, "sd-v1-5", (*cli.DOWNLOADS["sd-v1-5"][:2],
                                                   hashlib.sha256(b"not the real weights").hexdigest()))
    rc, out, _ = run(capsys, "download")
    assert rc == 0 and out == "wrote weights/v1-5-pruned-emaonly.safetensors (sha256 checked)\n"
    rc, _, err = run(capsys, "download")
    assert rc == 1 and "already exists; not overwritten" in err
    assert (in_tmp / "weights" / "v1-5-pruned-emaonly.safetensors").read_bytes() == b"not the real weights"


def test_the_search_for_real_weights_passes_over_random_checkpoints(in_tmp, capsys):
    """After the README's main job, weights/ holds a random checkpoint: the CLI may use it, but
    the tests' `weights` tier and the notebooks (real_only=True) must not take it for real weights."""
    from ldm import weights

    assert weights.find_checkpoint("weights") is None
    run(capsys, "random-checkpoint", "weights/random-tiny.safetensors")
    random_ckpt = in_tmp / "weights" / "random-tiny.safetensors"
    assert weights.is_random(random_ckpt)
    assert weights.find_checkpoint("weights") == random_ckpt.relative_to(in_tmp)
    assert weights.find_checkpoint("weights", real_only=True) is None
    (in_tmp / "weights" / "real").mkdir()
    (in_tmp / "weights" / "real" / "model_index.json").write_text("{}")  # a diffusers folder counts
    assert weights.find_checkpoint("weights", real_only=True) == Path("weights/real")
