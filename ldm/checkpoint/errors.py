"""The checkpoint reader's errors: one line each, naming the file, what it looks like, what ldm reads."""
from __future__ import annotations

from ldm import families

__all__ = ["CheckpointError", "UnsafeCheckpointError", "one_line", "printable", "unsupported", "supported_text"]


def printable(text: str) -> str:
    """text with control characters written as escapes (a newline as \\n, ESC as \\x1b): a path or
    key name from a hostile file cannot break an error into lines or drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of a supported family, or a state dict that does not fit a module.
    Its message is one printable line whatever the file's name or keys hold."""

    def __init__(self, message: str = ""):
        super().__init__(printable(str(message)))


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint that tries to call code; it was refused and nothing ran."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line (torch's messages span several)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def supported_text() -> str:
    """What ldm reads, from the family records: the sentence every refusal ends with."""
    fams = families.supported()
    names = " and ".join(dict.fromkeys(f.title for f in fams))
    prefixes = list(dict.fromkeys(f.prefixes[s] for s in ("unet", "vae", "text_encoder") for f in fams
                                  if s in f.prefixes))
    keys = ", ".join(f"{p}*" for p in prefixes[:-1]) + f" and {prefixes[-1]}*"
    return (f"ldm reads {names} checkpoints: single files (.safetensors, .ckpt) with {keys} keys, "
            f"or diffusers folders (model_index.json, unet/, vae/, text_encoder/)")


def unsupported(where, what: str) -> CheckpointError:
    """The refusal of a file that looks like `what` (another family, a LoRA, a VAE on its own ...)."""
    return CheckpointError(f"{where}: this looks like {what}, which ldm does not support. {supported_text()}.")
