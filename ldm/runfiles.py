"""A training run's doors: the numbers it accepts, and the files it reads and writes in its output.

ldm.train and ldm.finetune take their settings from a command line and write into a folder that
may already hold files, some of them planted. What they share to stay safe there, top to bottom:

1. Allowed values: `Range` (`ints`, `reals`) is a numeric option's documented range, checked before
   any work, so a typo (a batch of 10**8, a learning rate of inf, a NaN) is one line naming the
   option, not an exhausted machine; `check_device_name` refuses a device torch would reject mid-run.
2. Checkpoints: `save` writes through a temporary file; `load_checkpoint` reads one back through
   ldm.checkpoint.unpickle's restricted reader (never torch.load: a planted file cannot run code)
   and checks the fields a loop reads; `restore` loads a state dict with one-line errors naming the
   file. Both raise `CheckpointFileError`.
3. The output: `output_lock` holds an flock while a run writes, so a second run on the same output
   refuses at once (`OutputError`) instead of overwriting the first one's files.
"""
from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.checkpoint import unpickle
from ldm.commandline import error_text, short

__all__ = ["Range", "ints", "reals", "MAX_STEPS", "SEED", "THREADS", "check_device_name", "save",
           "CheckpointFileError", "load_checkpoint", "restore", "OutputError", "output_lock"]


# --- 1. allowed values -----------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """The allowed values of one numeric option: lo..hi, either end open, integers or real numbers.
    NaN lies in no range and infinity beyond every one, so both are refused with the rest."""

    lo: float
    hi: float
    integer: bool = True
    open_lo: bool = False
    open_hi: bool = False

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        above = value > self.lo if self.open_lo else value >= self.lo
        below = value < self.hi if self.open_hi else value <= self.hi
        return above and below

    def __str__(self) -> str:  # ">= 1 and <= 1024", "> 0 and <= 1"
        lo, hi = (self.lo, self.hi) if self.integer else (f"{self.lo:g}", f"{self.hi:g}")
        return f"{'>' if self.open_lo else '>='} {lo} and {'<' if self.open_hi else '<='} {hi}"

    def kind(self) -> str:
        return f"{'an integer' if self.integer else 'a number'} {self}"

    def check(self, label: str, value) -> None:
        """Raise ValueError '<label><value> must be ...' unless value is in the range."""
        if value not in self:
            wrong_type = isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float))
            raise ValueError(f"{label}{short(value)} must be {self.kind() if wrong_type else self}")


def ints(lo: int, hi: int) -> Range:
    return Range(lo, hi)


def reals(lo: float, hi: float, open_lo: bool = False, open_hi: bool = False) -> Range:
    return Range(lo, hi, integer=False, open_lo=open_lo, open_hi=open_hi)


MAX_STEPS = 10**7  # days of training at the recipe's speed; more is a typo, not a run
SEED = ints(0, 2**32 - 1)
THREADS = ints(0, 256)
DEVICE = re.compile(r"cpu|cuda(:[0-9]{1,2})?")  # and "auto" where a field allows it


def check_device_name(label: str, device: str, auto: bool = True, available: bool = True) -> None:
    """Refuse a device name torch would reject mid-run ('banana'), and (available=True) CUDA on a
    machine without it."""
    allowed = ("auto, " if auto else "") + "cpu, cuda, cuda:N"
    if not isinstance(device, str) or not (DEVICE.fullmatch(device) or (auto and device == "auto")):
        raise ValueError(f"{label}{short(device)} must be one of {allowed}")
    if available and device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{label}{short(device)}: CUDA is not available on this machine; allowed: "
                         f"{'auto, ' if auto else ''}cpu")


# --- 2. checkpoints --------------------------------------------------------------------------


def save(path: Path, state: dict) -> None:
    """torch.save through a temporary file: a crash never leaves a half-written checkpoint, and a failed
    write (a full disk) removes its part. The checkpoint holds tensors and plain data only (dicts,
    lists, numbers, strings), all that load_checkpoint's restricted reader accepts."""
    tmp = path.with_name(path.name + ".partial")
    try:
        torch.save(state, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class CheckpointFileError(ValueError):
    """A checkpoint in --out that cannot be read or resumed; the message names the file."""


def _numbers(value, kinds=(int, float)) -> bool:
    return not isinstance(value, bool) and isinstance(value, kinds) and math.isfinite(value)


def _checkpoint_problem(ck, networks: tuple[str, ...]) -> str | None:
    """What is wrong with a checkpoint's contents for the loop that reads them, or None."""
    if not isinstance(ck, dict):
        return f"it holds a {type(ck).__name__}, not a dict"
    if missing := [k for k in (*networks, "opt", "step", "elapsed") if k not in ck]:
        return f"it lacks {missing}"
    if not all(isinstance(ck[k], dict) for k in (*networks, "opt")):
        return f"its {[*networks, 'opt']} are not all dicts"
    if not (type(ck["step"]) is int and 0 <= ck["step"] <= MAX_STEPS):
        return f"step={short(ck['step'])} is not an integer >= 0 and <= {MAX_STEPS}"
    if not (_numbers(ck["elapsed"]) and ck["elapsed"] >= 0):
        return f"elapsed={short(ck['elapsed'])} is not a finite number of seconds"
    history = ck.get("history", [])
    if not (isinstance(history, list) and all(isinstance(h, list) and len(h) == 2 and all(map(_numbers, h))
                                              for h in history)):
        return "its history is not a list of [step, loss] pairs"
    for key in ("metrics", "encoder_metrics"):
        metrics = ck.get(key)
        if metrics is not None and not (isinstance(metrics, dict) and all(map(_numbers, metrics.values()))):
            return f"its {key} are not a dict of finite numbers"
    if isinstance(ck.get("metrics"), dict) and not ck["metrics"].get("scaling_factor", 1) > 0:
        return f"its scaling_factor {short(ck['metrics']['scaling_factor'])} is not > 0"
    return None


def load_checkpoint(path: Path, networks: tuple[str, ...]) -> dict:
    """A checkpoint that `save` wrote (vae.pt, latent.pt), read without running anything it names.

    torch.load(weights_only=False) would run any code a planted file asks for (an object whose
    __reduce__ returns os.system). ldm.checkpoint.unpickle's restricted reader never imports or calls
    a name from the file and bounds every size by the file's content; and since `save` writes only
    tensors and plain data, a pickle that names any class at all is refused here. Then the fields the
    loop reads are checked (`networks`: the state dicts it loads), so a wrong file ends in one
    line naming it, not in a traceback halfway through training."""
    allowed = "a checkpoint that ldm train wrote (tensors and plain data)"
    try:
        ck, stand_ins = unpickle.read_torch_zip(path)
    except unpickle.Refused as e:
        raise CheckpointFileError(f"{path}: refused, the pickle {error_text(e)}; nothing was run; "
                                  f"allowed: {allowed}") from None
    except Exception as e:  # noqa: BLE001 - zipfile, Corrupt, OSError: whatever it is, it is not ours
        raise CheckpointFileError(f"{path}: unreadable ({type(e).__name__}: {error_text(e)}); "
                                  f"allowed: {allowed}") from None
    if stand_ins:
        raise CheckpointFileError(f"{path}: refused, the pickle names {short(stand_ins[:3])}; nothing was run; "
                                  f"allowed: {allowed}")
    if problem := _checkpoint_problem(ck, networks):
        raise CheckpointFileError(f"{path}: not a checkpoint this run can resume: {problem}; allowed: {allowed}")
    return ck


def restore(path: Path, module_or_opt, state: dict) -> None:
    """load_state_dict from a checkpoint, its errors (another config's shapes) one line naming the file.
    An optimiser's per-parameter state is checked too: torch loads it unchecked and fails steps later."""
    try:
        module_or_opt.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise CheckpointFileError(f"{path}: cannot resume from it ({error_text(e)}); allowed: a checkpoint "
                                  f"of this config (the same network sizes)") from None
    if isinstance(module_or_opt, torch.optim.Optimizer):
        for p, st in module_or_opt.state.items():
            for k, v in st.items():
                fits = (v.ndim == 0 or v.shape == p.shape) if isinstance(v, torch.Tensor) else _numbers(v)
                if not fits:
                    what = tuple(v.shape) if isinstance(v, torch.Tensor) else short(v)
                    raise CheckpointFileError(f"{path}: cannot resume from it: its optimiser state {short(k)} is "
                                              f"{what} for a parameter of shape {tuple(p.shape)}; allowed: a "
                                              f"checkpoint of this config")


# --- 3. the output ---------------------------------------------------------------------------


class OutputError(OSError):
    """An output that cannot be written now: another process is writing it, or its folder cannot be made."""


@contextmanager
def output_lock(lock_path: Path, what: str):
    """Hold an exclusive lock on `lock_path` while this process writes `what` ("--out runs/x"): a second
    run writing the same output refuses at once (OutputError) instead of overwriting the first's files.

    fcntl.flock: the OS releases the lock when its holder exits or is killed, so a stale lock file never
    blocks a later run. The file is removed on release, under the lock; a process that opened it just
    before then finds it gone (another inode than the path's) and tries again."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): run unlocked, as before
        yield
        return
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(f"{what} is in use by another process (it holds {lock_path}); nothing was "
                                  f"written; allowed: wait for it to finish, or pick another output") from None
            try:
                if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
    except OSError as e:
        if isinstance(e, OutputError):
            raise
        in_the_way = next((a for a in lock_path.parents if a.exists()), None)  # the deepest part that exists
        reason = (f"{in_the_way} is a file, not a folder" if in_the_way is not None and not in_the_way.is_dir()
                  else f"{e.strerror or error_text(e)}: {e.filename or lock_path}")
        raise OutputError(f"{what}: cannot write there ({reason}); allowed: a folder this process can create "
                          f"and write") from None
    try:
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)
