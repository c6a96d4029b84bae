"""What every ldm command shares: an argument parser and error lines that fit on one line.

The `ldm` command (ldm.cli), `python -m ldm.train` and `python -m ldm.finetune` end every failure in
one line on stderr, never in a traceback or a page of usage. This module holds the pieces they share
and imports nothing of ldm, so a command imports it and the library below it, never another command:

    ArgumentParser    argparse with its usage errors on one line
    short(value)      repr(value), cut: a hostile value never floods an error line
    error_text(e)     an exception's message as one short line
    command(main)     run a `python -m` entry point: its refusals and any other error as one line
"""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["ArgumentParser", "short", "error_text", "command"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (argparse's own prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (`{self.prog} --help` lists the options)\n")


def short(value, limit: int = 60) -> str:
    """repr(value), cut to about `limit` characters: a hostile value never floods an error line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def error_text(e: BaseException, limit: int = 160) -> str:
    """An exception as one short line (torch's and the unpickler's messages may span several)."""
    text = " ".join(str(e).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def command(main_fn, prog: str) -> int:
    """`python -m ldm.train` / `python -m ldm.finetune` as the `ldm` command runs: the library's refusals
    (SystemExit with a message) and any other error end in one line on stderr and a non-zero status,
    not a traceback (LDM_DEBUG=1 shows it); Ctrl-C is status 130."""
    debug = os.environ.get("LDM_DEBUG", "") not in ("", "0")
    try:
        main_fn()
        return 0
    except KeyboardInterrupt:
        if debug:
            raise
        status, message = 130, f"{prog}: interrupted"
    except Exception as e:  # noqa: BLE001 - the last line of defence of a command
        if debug:
            raise
        status, message = 1, (f"{prog}: error: {type(e).__name__}: {error_text(e, 300)} "
                              f"(LDM_DEBUG=1 shows the traceback)")
    # printed after the except block has dropped the traceback: the failed stage's progress bar is
    # closed (and drawn) by then, so the error is the last line
    print(message, file=sys.stderr)
    return status
