"""The `ldm` command: what a user types, what they see, and that failures are one line."""
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
