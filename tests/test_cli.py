"""The `ldm` command: what a user types, what they see, and that failures are one line."""
import dataclasses
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm import cli, memory


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LDM_CHECKPOINT", raising=False)
    return tmp_path


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(err: str, *needles: str):
    """stderr is exactly one non-empty line, without a traceback, and names each needle."""
    assert err.endswith("\n") and err.count("\n") == 1 and err.strip(), repr(err)
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_random_checkpoint_then_info_then_encode(in_tmp, capsys):
    rc, out, _ = run(capsys, "random-checkpoint", "weights/random-tiny.safetensors")
    assert rc == 0 and "wrote weights/random-tiny.safetensors" in out
    rc, out, _ = run(capsys, "info", "weights/random-tiny.safetensors")
    assert rc == 0 and "family  sd1" in out and "safetensors" in out
    rc, out, _ = run(capsys, "encode", "a dog wearing a hat", "--checkpoint", "weights/random-tiny.safetensors")
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


def test_encode_without_a_checkpoint_uses_the_shipped_model(in_tmp, capsys):
    from ldm import weights

    rc, out, err = run(capsys, "encode", "a red circle")
    assert rc == 0 and err == ""
    assert out.startswith("using ldm's shipped shapes model ldm-shapes.safetensors (no real checkpoint")
    assert f"checkpoint {weights.SHIPPED}" in out


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


@pytest.mark.parametrize("argv, expected", [
    (("random-checkpoint", "x.safetensors", "--size", "huge"), "invalid choice: 'huge'"),
    (("generate", "a dog", "--steps", "abc"), "argument --steps: invalid int value: 'abc'"),
    (("generate", "a dog", "--guidance", "lots"), "argument --guidance: invalid float value: 'lots'"),
    (("generate", "a dog", "--size", "big"), "size 'big' must look like WIDTHxHEIGHT"),
    (("generate", "a dog", "--size", "1x2x3"), "size '1x2x3' must look like WIDTHxHEIGHT"),
    (("generate", "a dog", "--device", "bogus"), "device 'bogus' is not one of cpu, cuda, cuda:N"),
    (("generate", "a dog", "--device", "cuda:x"), "device 'cuda:x' is not one of"),
    (("generate", "a dog", "--device", "meta"), "device 'meta' is not one of"),
    (("generate", "a dog", "--size", "0x0"), "size '0x0' must look like WIDTHxHEIGHT in positive pixels"),
    (("generate", "a dog", "--size=-64x64"), "size '-64x64' must look like WIDTHxHEIGHT in positive pixels"),
    (("generate", "a dog", "--original-size", "1024x0"), "size '1024x0' must look like WIDTHxHEIGHT"),
    (("generate", "a dog", "--crop", "0x0"), "crop '0x0' must look like TOP,LEFT in pixels"),
    (("generate",), "the following arguments are required: prompt"),
    (("generate", "a dog", "--no-such-option"), "unrecognized arguments: --no-such-option"),
    (("img2img", "a dog"), "the following arguments are required: --image"),
    (("download", "sd-v9"), "invalid choice: 'sd-v9'"),
    ((), "the following arguments are required: command"),
])
def test_usage_errors_are_one_line_with_status_2(in_tmp, capsys, argv, expected):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert_one_line(err, expected, "--help")


def test_usage_error_in_a_real_process_is_one_line():
    """What the shell sees: argparse's own usage dump would be several lines before the error."""
    p = subprocess.run([sys.executable, "-m", "ldm.cli", "generate", "a dog", "--steps", "abc"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert_one_line(p.stderr, "ldm generate: error: argument --steps: invalid int value: 'abc'")


def test_help_still_works(capsys):
    rc, out, err = run(capsys, "generate", "--help")
    assert rc == 0 and "--num-images" in out and "--device" in out and err == ""


@pytest.mark.parametrize("exc, rc_expected, expected", [
    (RuntimeError("something broke\n  with details on a second line"), 1,
     "ldm: error: RuntimeError: something broke (`ldm --debug ...` or LDM_DEBUG=1 shows the traceback)"),
    (KeyError("unet.weight"), 1, "KeyError: 'unet.weight'"),
    (MemoryError(), 1, "out of memory (MemoryError); try a smaller --size"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"), 1,
     "out of memory (DefaultCPUAllocator: can't allocate memory"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB\nmore"), 1,
     "out of memory (CUDA out of memory. Tried to allocate 20 GiB)"),
    (ValueError("strength=2 is\n outside [0, 1]"), 1, "ldm: error: strength=2 is outside [0, 1]"),
    (KeyboardInterrupt(), 130, "ldm: interrupted"),
])
def test_any_failure_is_one_line_and_debug_shows_the_traceback(in_tmp, capsys, monkeypatch, exc, rc_expected,
                                                               expected):
    def failing(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_info", failing)
    rc, out, err = run(capsys, "info", "x.safetensors")
    assert rc == rc_expected and out == ""
    assert_one_line(err, expected)
    assert "second line" not in err and "more" not in err
    with pytest.raises(type(exc)):  # --debug after the subcommand, or before it
        cli.main(["info", "x.safetensors", "--debug"])
    with pytest.raises(type(exc)):
        cli.main(["--debug", "info", "x.safetensors"])
    monkeypatch.setenv("LDM_DEBUG", "1")
    with pytest.raises(type(exc)):
        cli.main(["info", "x.safetensors"])


def test_unwritable_places_are_one_line_and_the_file_in_the_way_is_kept(in_tmp, capsys):
    (in_tmp / "afile").write_text("the user's file")
    rc, _, err = run(capsys, "random-checkpoint", "afile/x.safetensors")
    assert rc == 1
    assert_one_line(err, "afile/x.safetensors: its folder afile: cannot write there", "a file is in the way")
    rc, _, err = run(capsys, "download", "--dir", "afile/sub")
    assert rc == 1
    assert_one_line(err, "--dir afile/sub: cannot write there", "a file is in the way")
    assert (in_tmp / "afile").read_text() == "the user's file"


def test_a_folder_or_a_missing_file_as_checkpoint_is_one_line(in_tmp, capsys):
    (in_tmp / "adir").mkdir()
    rc, _, err = run(capsys, "info", "adir")
    assert rc == 1
    assert_one_line(err, "adir: a directory without model_index.json")
    rc, _, err = run(capsys, "encode", "a dog", "--checkpoint", "missing.safetensors")
    assert rc == 1
    assert_one_line(err, "missing.safetensors: no such file or directory")


# ---- generation verbs ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """One random tiny checkpoint for the module, written as `ldm random-checkpoint` writes it."""
    path = tmp_path_factory.mktemp("tiny") / "random-tiny.safetensors"
    assert cli.main(["random-checkpoint", str(path)]) == 0
    return path


@pytest.fixture
def with_tiny(in_tmp, tiny_file, capsys, monkeypatch):
    """A random tiny checkpoint in weights/, named by $LDM_CHECKPOINT (a random file in weights/ alone
    is passed over for the shipped model: it paints noise)."""
    (in_tmp / "weights").mkdir()
    shutil.copy(tiny_file, in_tmp / "weights" / "random-tiny.safetensors")
    monkeypatch.setenv("LDM_CHECKPOINT", "weights/random-tiny.safetensors")
    capsys.readouterr()
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
    (("img2img", "a dog", "--image", "weights"), "--image weights: cannot read it as an image"),
    (("img2img", "a dog", "--image", "in.png", "--strength", "2"), "strength=2.0 is outside [0, 1]"),
    (("img2img", "a dog", "--image", "in.png", "--strength", "nan"), "strength=nan is outside [0, 1]"),
    (("img2img", "a dog", "--image", "deep.png"), "image has mode 'I;16'"),
    (("inpaint", "a dog", "--image", "in.png", "--mask", "small.png"), "mask is 32x32 pixels but the image is 64x64"),
    (("inpaint", "a dog", "--image", "in.png", "--mask", "in.png", "--strength", "-1"), "strength=-1.0 is outside"),
    (("generate", "a dog", "--steps", "-3"), "steps=-3 is not allowed"),
    (("generate", "a dog", "--steps", "100000"), "steps=100000 is not allowed"),
    (("generate", "a dog", "--num-images", "0"), "num_images=0 must be an integer >= 1"),
    (("generate", "a dog", "--seed", "-1"), "seed=-1 must be a non-negative int"),
    (("generate", "a dog", "--seed", str(2**70)), f"seed={2**70} must be a non-negative int"),
])
def test_bad_generation_input_is_one_line(with_tiny, capsys, argv, expected):
    from PIL import Image

    Image.new("RGB", (64, 64)).save("in.png")
    Image.new("L", (32, 32)).save("small.png")
    Image.new("I;16", (64, 64)).save("deep.png")
    rc, out, err = run(capsys, *argv, "-q")
    assert rc == 1 and out == ""
    assert_one_line(err, expected)
    assert not (with_tiny / "outputs").exists() or not any((with_tiny / "outputs").iterdir())


def test_an_image_over_pils_pixel_limit_is_one_line(with_tiny, capsys, monkeypatch):
    from PIL import Image

    Image.new("RGB", (64, 64)).save("in.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 x the limit: PIL refuses it
    rc, _, err = run(capsys, "img2img", "a dog", "--image", "in.png", "-q")
    assert rc == 1
    assert_one_line(err, "--image in.png:", "exceeds limit")


def test_cuda_or_mps_that_is_not_there_is_one_line_before_loading(with_tiny, capsys, monkeypatch):
    import ldm

    def no_load(*a, **k):
        raise AssertionError("the device must be checked before the model is loaded")

    monkeypatch.setattr(ldm, "load", no_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, out, err = run(capsys, "generate", "a dog", "--device", "cuda", "-q")
    assert rc == 1 and out == ""
    assert_one_line(err, "--device cuda: CUDA is not available", "--device cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    rc, _, err = run(capsys, "generate", "a dog", "--device", "cuda:5", "-q")
    assert rc == 1
    assert_one_line(err, "--device cuda:5: this machine has 2 CUDA devices (cuda:0 to cuda:1)")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    rc, _, err = run(capsys, "generate", "a dog", "--device", "mps", "-q")
    assert rc == 1
    assert_one_line(err, "--device mps: Apple's MPS is not available")


def _memory_of(h, w, n, **kw):
    """working_memory of the tiny checkpoint's networks at the CLI's defaults, host and device together."""
    from ldm import checkpoint, weights

    cfgs = weights.configs_for(checkpoint.read("weights/random-tiny.safetensors"))
    return sum(memory.working_memory(cfgs["unet"], cfgs["vae"], h, w, n, **kw))


@pytest.mark.parametrize("argv, expected", [
    (("--size", "100000x100000"), "--size 100000x100000: an image of 100000x100000 needs about"),
    (("--num-images", "100000", "--size", "64x64"), "--num-images 100000: 100000 images of 64x64 need about"),
])
def test_more_than_the_machine_holds_is_refused_with_the_limit(with_tiny, capsys, monkeypatch, argv, expected):
    import re

    gib = 2**30
    monkeypatch.setattr(memory, "available_memory", lambda device: 2 * gib)
    rc, out, err = run(capsys, "generate", "a dog", *argv, "-q")
    assert rc == 1 and out == ""
    assert_one_line(err, expected, "GiB and this machine has 2.0 GiB of RAM free")
    assert not (with_tiny / "outputs").exists() or not any((with_tiny / "outputs").iterdir())
    if "--size" == argv[0]:  # the stated limit is the estimate's: it fits, 8 pixels more does not
        side = int(re.search(r"the largest that fits is about (\d+)x\1$", err.strip()).group(1))
        assert _memory_of(side, side, 1) <= 2 * gib < _memory_of(side + 8, side + 8, 1)
        assert float(re.search(r"needs about ([\d.]+) GiB", err).group(1)) == pytest.approx(
            _memory_of(100000, 100000, 1) / gib, abs=0.06)
    else:
        most = int(re.search(r"at most (\d+) fit at this size$", err.strip()).group(1))
        assert _memory_of(64, 64, most) <= 2 * gib < _memory_of(64, 64, most + 1)


def test_img2img_of_an_image_too_big_for_memory_names_the_image(with_tiny, capsys, monkeypatch):
    from PIL import Image

    Image.new("RGB", (512, 512)).save("big.png")
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**20)  # 1 MiB
    rc, _, err = run(capsys, "img2img", "a dog", "--image", "big.png", "-q")
    assert rc == 1
    assert_one_line(err, "--image big.png (512x512): an image of 512x512 needs about", "0.0 GiB of RAM free")


def test_the_memory_checks_are_the_librarys_and_the_cli_prints_their_line(with_tiny, capsys, monkeypatch):
    """ldm.memory from Python: check_fits and check_device raise ValueErrors whose message is the line
    the command prints after `ldm: error: `."""
    import ldm

    monkeypatch.setattr(memory, "available_memory", lambda device: 2**30)
    pipe = ldm.load("weights/random-tiny.safetensors", device="cpu")
    with pytest.raises(memory.DoesNotFit) as caught:
        memory.check_fits(pipe, 100000, 100000, 1, "--size 100000x100000", steps=25, guidance=7.5)
    assert isinstance(caught.value, ValueError)
    rc, _, err = run(capsys, "generate", "a dog", "--size", "100000x100000", "-q")
    assert rc == 1 and err == f"ldm: error: {caught.value}\n"
    assert memory.check_fits(pipe, 64, 64, 1, "--size 64x64") is None  # fits: nothing to say
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert memory.check_device(None) == torch.device("cpu")
    with pytest.raises(memory.DeviceError, match="^--device cuda: CUDA is not available"):
        memory.check_device(torch.device("cuda"))


def test_the_memory_estimate_lets_sd_run_where_it_runs():
    """Full SD 1.x at 512x512 with guidance runs in well under 8 GB; the estimate must not refuse it,
    and must grow with what is asked (more images, more pixels, guidance doubles the UNet batch)."""
    from ldm.unet import UNetConfig
    from ldm.vae import VAEConfig

    def gib(*a, **k):
        return sum(memory.working_memory(UNetConfig(), VAEConfig(), *a, **k)) / 2**30

    one = gib(512, 512, 1)
    assert 0.3 < one < 3, one
    assert gib(512, 512, 4) < 8
    assert gib(512, 512, 2) > one and gib(1024, 1024, 1) > one
    assert gib(2048, 2048, 1, guidance=1.0) < gib(2048, 2048, 1)  # the UNet's batch, not the tiled VAE, rules here
    assert gib(100000, 100000, 1) > 1000  # what the issue typed: no machine holds it


def test_unwritable_output_folder_fails_before_sampling(with_tiny, capsys):
    (with_tiny / "taken").write_text("a file where the folder should go")
    rc, _, err = run(capsys, "generate", "a dog", "--out", "taken/sub", "-q")
    assert rc == 1 and err.startswith("ldm: error: --out taken/sub: cannot write there") and err.count("\n") == 1
    assert (with_tiny / "taken").read_text() == "a file where the folder should go"


def test_generate_without_a_real_checkpoint_uses_the_shipped_model(in_tmp, tiny_file, capsys):
    """A random checkpoint in weights/ paints noise: it is passed over, and the shipped model named."""
    from PIL import Image

    (in_tmp / "weights").mkdir()
    shutil.copy(tiny_file, in_tmp / "weights" / "random-tiny.safetensors")
    rc, out, err = run(capsys, "generate", "a red circle", "--steps", "4", "--seed", "0", "-q", "--out", "o")
    assert rc == 0 and err == "", err
    first, wrote = out.splitlines()
    assert first.startswith("using ldm's shipped shapes model ldm-shapes.safetensors (no real checkpoint")
    assert wrote == "wrote o/00000-0.png (64x64, seed 0)"  # the model's own default size
    with Image.open(in_tmp / "o" / "00000-0.png") as im:
        assert im.size == (64, 64) and "Model: ldm-shapes" in im.text["parameters"]


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
    monkeypatch.setitem(cli.DOWNLOADS, "sd-v1-5", dataclasses.replace(
        cli.DOWNLOADS["sd-v1-5"], sha256=hashlib.sha256(b"not the real weights").hexdigest()))
    rc, out, _ = run(capsys, "download")
    assert rc == 0 and out == "wrote weights/v1-5-pruned-emaonly.safetensors (sha256 checked)\n"
    rc, _, err = run(capsys, "download")
    assert rc == 1 and "already exists; not overwritten" in err
    assert (in_tmp / "weights" / "v1-5-pruned-emaonly.safetensors").read_bytes() == b"not the real weights"
    # a file that appears at the target while the download runs (another process) is never replaced
    target = in_tmp / "weights" / "v1-5-pruned-emaonly.safetensors"
    target.unlink()

    def racing_download(repo, filename, local_dir):
        target.write_bytes(b"the other process's file")
        return fake_download(repo, filename, local_dir)

    monkeypatch.setattr(hub, "hf_hub_download", racing_download)
    rc, _, err = run(capsys, "download")
    assert rc == 1 and "already exists; not overwritten" in err
    assert target.read_bytes() == b"the other process's file"
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


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


def test_train_passes_its_arguments_through_and_its_errors_are_one_line(in_tmp, capsys):
    rc, out, err = run(capsys, "train", "--set", "vae_stepz=3", "--out", "runs/x")
    assert rc == 1 and out == ""
    assert_one_line(err, "unknown config key 'vae_stepz'", "vae_steps")
    assert not (in_tmp / "runs").exists()  # refused before anything was written
    rc, out, _ = run(capsys, "train", "--help")
    assert rc == 0 and "--resume" in out and "--vae-decoder-steps" in out
