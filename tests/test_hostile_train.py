"""Hostile input through ldm.train and ldm.finetune (issue 17, item 4): each ends in the library's own
one-line error naming the file or argument, the value and what is allowed, within seconds and bounded
memory, with nothing executed and nothing overwritten.

One test (or parametrized family) per defect class:
  planted pickles in --out       load_checkpoint's restricted reader: nothing runs, the file is named
  hang / memory through --set    every numeric field has a documented range, checked before any work
  finetune options and --out     finite, bounded options; --out checked before work, written atomically
  tracebacks from `python -m`    one line on stderr and a non-zero status
  two processes, one output      the second refuses (flock); a killed first one does not block later runs
"""
import builtins
import dataclasses
import errno
import io
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bounded import assert_one_line_error, run_bounded
from ldm import finetune, recipe, runfiles, train
from test_finetune import MICRO as FT_MICRO, tiny
from test_train import micro

ERRORS = ("SystemExit",)


class Evil:
    """An object whose unpickling runs a shell command: `touch marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def stage1(out: Path, *extra) -> None:
    """A finished micro stage 1 in `out` (one step: about a second)."""
    train.main(micro(out, "--stage", "vae", "--set", "vae_steps=1", *extra))


# --- 1. planted pickles: nothing runs, the file is named --------------------------------------------------


@pytest.mark.parametrize("site", ["vae --resume", "unet without --resume", "latent --resume"])
def test_planted_pickle_in_out_is_refused_and_never_runs(tmp_path, site):
    out, marker = tmp_path / "run", tmp_path / "MARKER"
    out.mkdir()
    if site == "latent --resume":
        stage1(out)
        planted, argv = out / train.LATENT_CKPT, micro(out, "--stage", "unet", "--resume", "--set", "vae_steps=1")
    else:
        planted = out / train.VAE_CKPT
        argv = micro(out, "--stage", "vae", "--resume") if site == "vae --resume" else micro(out, "--stage", "unet")
    torch.save({"vae": Evil(marker), "model": Evil(marker)}, planted)
    before = planted.read_bytes()
    result = run_bounded(lambda: train.main(argv))
    message = assert_one_line_error(result, ERRORS, str(planted), match="nothing was run", max_len=400)
    assert "system" in message, message  # what it tried to call
    assert not marker.exists(), "the pickle ran its command"
    assert planted.read_bytes() == before and not (out / train.MODEL_FILE).exists()


def test_train_never_unpickles_with_torch_load(tmp_path, monkeypatch):
    """The other call sites (the reload after stage 1, run's reads of vae.pt and latent.pt): a whole
    micro run and its resume go through the restricted reader, never torch.load."""
    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load called: it can run code from a file in --out")
    monkeypatch.setattr(torch, "load", no_torch_load)
    common = ["--set", "vae_steps=1", "--set", "unet_steps=1"]
    train.main(micro(tmp_path, "--stage", "vae", *common))
    result = train.main(micro(tmp_path, "--stage", "unet", "--resume", *common))
    assert Path(result["model"]).exists()


@pytest.mark.parametrize("content, words", [
    (b"garbage, not a zip", "unreadable"),
    ({"vae": {"conv.weight": torch.zeros(1)}, "opt": {}, "step": 1, "elapsed": 0.0}, "cannot resume"),
    ({"vae": {}, "opt": {}, "step": "many", "elapsed": 0.0}, "step='many'"),
])
def test_resume_errors_name_the_file(tmp_path, content, words):
    """Resuming from a broken or foreign checkpoint: one line naming the file, not torch's traceback."""
    ckpt = tmp_path / train.VAE_CKPT
    if isinstance(content, bytes):
        ckpt.write_bytes(content)
    else:
        torch.save(content, ckpt)
    before = ckpt.read_bytes()
    result = run_bounded(lambda: train.main(micro(tmp_path, "--stage", "vae", "--resume")))
    assert_one_line_error(result, ERRORS, str(ckpt), match=words, max_len=400)
    assert ckpt.read_bytes() == before


# --- 2. hang / memory through --set: every numeric field bounded, checked before any work ------------------


@pytest.mark.parametrize("item, shown, allowed", [
    ("vae_batch=100000000", "vae_batch=100000000", "<= 1024"),
    ("unet_batch=100000000", "unet_batch=100000000", "<= 1024"),
    ("pool_size=1000000000", "pool_size=1000000000", "<= 65536"),
    ("vae_eval_images=100000000", "vae_eval_images=100000000", "<= 4096"),
    ("unet_steps=1000000000000", "unet_steps=1000000000000", "<= 10000000"),
    ("seed=1e14", "seed='1e14'", "an integer >= 0"),
    ("seed=100000000000000", "seed=100000000000000", "<= 4294967295"),
    ("threads=1e11", "threads='1e11'", "an integer >= 0 and <= 256"),
    ("threads=100000000000", "threads=100000000000", "<= 256"),
    ("device=banana", "device='banana'", "auto, cpu, cuda"),
    ("vae_ch_mult=abc", "vae_ch_mult='abc'", "a tuple of integers"),
    ("unet_channel_mult=(1,1,1,1,1,1,1,1,1)", "unet_channel_mult=(1, 1, 1, 1, 1, 1, 1, 1, 1)", "1 to 4 integers"),
    ("vae_lr=1e309", "vae_lr=inf", "> 0 and <= 1"),
    ("grad_clip=-1e309", "grad_clip=-inf", "> 0"),
    ("kl_weight=" + "9" * 5000, "kl_weight='99999", "longer than 200 characters"),
])
def test_set_values_out_of_range_are_refused_up_front(tmp_path, item, shown, allowed):
    out = tmp_path / "run"
    result = run_bounded(lambda: train.main(micro(out, "--set", item)), deadline_s=20)
    assert_one_line_error(result, ERRORS, "--set " + shown, match=allowed, max_len=300)
    assert result["seconds"] < 15 and not out.exists()  # refused before any folder or file


def test_every_numeric_field_has_a_documented_range():
    fields = {f.name: f.default for f in dataclasses.fields(recipe.TrainConfig)}
    assert set(fields) == set(recipe.RANGES) | set(recipe.TUPLES) | {"out", "stage", "device"}
    for name, allowed in recipe.RANGES.items():
        assert fields[name] in allowed, (name, fields[name], allowed)  # the defaults are allowed
        too_big = allowed.hi + (1 if allowed.integer else allowed.hi)
        with pytest.raises(ValueError, match=f"--set {name}="):
            train.make_config({name: repr(too_big)})
    for name, (fewest, most, each) in recipe.TUPLES.items():
        with pytest.raises(ValueError, match=f"--set {name}="):
            train.make_config({name: repr((1,) * (most + 1))})


# --- 3. finetune: finite bounded options, --out checked before any work, written atomically ------------------


@pytest.mark.parametrize("args, shown", [
    (["--lr", "inf"], "--lr inf"),
    (["--lr", "nan"], "--lr nan"),
    (["--alpha", "nan"], "--alpha nan"),
    (["--invert-lr", "inf"], "--invert-lr inf"),
    (["--batch", "100000000"], "--batch 100000000"),
    (["--images", "100000000"], "--images 100000000"),
    (["--seed", "-1"], "--seed -1"),
    (["--device", "banana"], "--device 'banana'"),
])
def test_finetune_refuses_bad_numbers_up_front(tmp_path, args, shown):
    out = tmp_path / "lora" / "x.safetensors"
    result = run_bounded(lambda: finetune.main(["--out", str(out), *FT_MICRO, "--steps", "1", *args], pipe=tiny()))
    assert_one_line_error(result, ERRORS, shown, match="must be", max_len=300)
    assert not out.parent.exists()


def test_finetune_checks_out_before_any_work(tmp_path, monkeypatch):
    """An --out whose folder cannot exist (a file is in the way) is refused before training, not after."""
    (tmp_path / "file").write_bytes(b"")
    out = tmp_path / "file" / "x.safetensors"

    def no_work(*args, **kwargs):
        raise AssertionError("the fine-tune started working before checking --out")
    monkeypatch.setattr(finetune, "new_scenes", no_work)
    with pytest.raises(SystemExit) as info:
        finetune.main(["--out", str(out), *FT_MICRO, "--steps", "1"], pipe=tiny())
    message = str(info.value.code)
    assert "\n" not in message and str(out) in message and "is a file, not a folder" in message, message


def test_full_disk_leaves_nothing_at_out(tmp_path):
    """The disk fills up halfway through writing the LoRA: a one-line error naming --out, and nothing
    left in its folder (no truncated file a later run would refuse as "already exists", no temp file)."""
    folder = tmp_path / "loras"
    out = folder / "x.safetensors"

    def run():
        real_open = builtins.open

        class HalfThenFull:  # writes half of what it is given, then the disk is full
            def __init__(self, f):
                self.f = f

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        def full_disk_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            writing = any(c in mode for c in "wxa") and Path(os.fsdecode(file)).parent == folder
            return HalfThenFull(f) if writing else f

        builtins.open = io.open = full_disk_open  # in the forked child only
        return finetune.main(["--out", str(out), *FT_MICRO, "--steps", "1"], pipe=tiny())

    result = run_bounded(run, deadline_s=60)
    assert_one_line_error(result, ERRORS, str(out), match="No space left on device", max_len=400)
    assert sorted(os.listdir(folder)) == []


# --- 4. `python -m ldm.train` / `python -m ldm.finetune`: one line on stderr, never a traceback ----------------


def _command(tmp_path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LDM_DEBUG", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)


BOOM = ("import runpy, sys; from ldm import shapes\n"
        "def boom(*a, **k): raise RuntimeError('boom\\nsecond line of the error')\n"
        "shapes.batch = boom\n"
        "sys.argv = ['ldm.train', '--out', 'run', '--set', 'threads=1', '--set', 'vae_ch=8', '--set', 'vae_steps=1']\n"
        "runpy.run_module('ldm.train', run_name='__main__', alter_sys=True)")


@pytest.mark.parametrize("case", ["train bad --set", "train fails while running", "finetune bad checkpoint"])
def test_python_m_ends_in_one_line(tmp_path, case):
    if case == "train bad --set":
        proc, words = _command(tmp_path, "-m", "ldm.train", "--out", "run", "--set", "device=banana"), "'banana'"
    elif case == "train fails while running":
        proc, words = _command(tmp_path, "-c", BOOM), "boom second line"
    else:
        (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
        proc = _command(tmp_path, "-m", "ldm.finetune", "--out", "x.safetensors", "--checkpoint", "bad.ckpt")
        words = "bad.ckpt"
    err = proc.stderr.strip()
    last = err.splitlines()[-1] if err else ""  # before it: the run's log lines, if it got that far
    assert proc.returncode != 0 and "Traceback" not in err, err[-2000:]
    assert last.startswith(("ldm train: ", "ldm finetune: ")) and words in last and len(last) < 400, err[-2000:]


# --- 5. two processes writing one output: the second refuses, a killed first one never blocks ------------------


def hold_halfway(run, module, name: str) -> int:
    """Fork a child that runs `run()` until it calls module.<name>, which signals and then waits: a first
    run caught halfway, holding its output. Returns the child's pid once it is there."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            torch.set_num_threads(1)

            def halfway(*args, **kwargs):
                os.write(write_end, b"x")
                time.sleep(120)
            setattr(module, name, halfway)
            run()
        finally:
            os._exit(0)
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], 60)
    got = os.read(read_end, 1) if ready else b""
    os.close(read_end)
    if got != b"x":
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the first run never got halfway")
    return pid


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)  # as a crash or `kill -9` would: no clean-up runs
    os.waitpid(pid, 0)


def test_two_trainings_on_one_out(tmp_path):
    common = ["--set", "vae_steps=1", "--set", "unet_steps=1"]
    first = hold_halfway(lambda: train.main(micro(tmp_path, *common)), train, "train_latent")
    try:
        vae_ckpt = (tmp_path / train.VAE_CKPT).read_bytes()  # the first run's stage 1, done
        with pytest.raises(SystemExit) as info:
            train.main(micro(tmp_path, "--resume", *common))
        message = str(info.value.code)
        assert "\n" not in message and f"--out {tmp_path}" in message and "in use" in message, message
        assert (tmp_path / train.VAE_CKPT).read_bytes() == vae_ckpt and not (tmp_path / train.LATENT_CKPT).exists()
    finally:
        kill(first)
    assert (tmp_path / train.LOCK_FILE).exists()  # a stale lock file, as a killed run leaves it ...
    result = train.main(micro(tmp_path, "--resume", *common))  # ... blocks nothing: the OS released it
    assert Path(result["model"]).exists() and not (tmp_path / train.LOCK_FILE).exists()


def test_two_finetunes_to_one_out(tmp_path):
    out = tmp_path / "x.safetensors"
    argv = ["--out", str(out), *FT_MICRO, "--steps", "1"]
    first = hold_halfway(lambda: finetune.main(argv, pipe=tiny()), finetune, "new_scenes")
    try:
        with pytest.raises(SystemExit) as info:
            finetune.main(argv, pipe=tiny())
        message = str(info.value.code)
        assert "\n" not in message and f"--out {out}" in message and "in use" in message, message
        assert not out.exists()
    finally:
        kill(first)
    with runfiles.output_lock(finetune.lock_path(out), f"--out {out}"):  # the killed one's lock is gone
        pass
    assert sorted(os.listdir(tmp_path)) == []
