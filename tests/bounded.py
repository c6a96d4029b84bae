"""Running hostile input in a bounded child process: shared by the hostile-input tests.

run_bounded(fn) calls fn() in a forked child limited to 1 GiB more address space than it already
maps (resource.RLIMIT_AS) and a deadline, so input that hangs the code, exhausts memory or
crashes the interpreter fails its test instead of the test run. The parent reads the child's
report while it runs, so a long message cannot fill the pipe and stall the child.
"""
from __future__ import annotations

import json
import os
import resource
import select
import signal
import time
from pathlib import Path

import pytest
import torch

GIB = 2**30
DEADLINE_S = 20


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    pytest.skip("needs /proc/self/status (Linux)")


def run_bounded(fn, deadline_s: float = DEADLINE_S, extra_bytes: int = GIB) -> dict:
    """fn() in a forked child limited to `extra_bytes` more address space and `deadline_s` seconds.
    Returns {"error": class name or None, "message": str(error), "value": repr(result)[:200],
    "path_ok": whether pathlib still works, "seconds": wall time}."""
    limit = _vm_size() + extra_bytes
    read_end, write_end = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:                                       # the child: never returns into pytest
        try:
            os.close(read_end)
            torch.set_num_threads(1)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            out = {"error": None, "message": None, "value": None}
            try:
                out["value"] = repr(fn())[:200]
            except BaseException as e:                 # noqa: BLE001 - reported to the parent
                out["error"], out["message"] = type(e).__name__, str(e)
            try:
                out["path_ok"] = str(Path("a") / "b") == "a/b"
            except BaseException:                      # noqa: BLE001
                out["path_ok"] = False
            data = json.dumps(out).encode()
            while data:
                data = data[os.write(write_end, data):]
        finally:
            os._exit(0)
    os.close(write_end)
    chunks, status = [], None
    while True:
        ready, _, _ = select.select([read_end], [], [], 0.02)
        if ready:
            chunk = os.read(read_end, 1 << 16)
            if chunk:
                chunks.append(chunk)
                continue
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            while chunk := os.read(read_end, 1 << 16):
                chunks.append(chunk)
            break
        if time.monotonic() - start > deadline_s:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
            pytest.fail(f"did not finish within {deadline_s} s")
    os.close(read_end)
    data = b"".join(chunks)
    if os.WIFSIGNALED(status) or not data:
        pytest.fail(f"the child died (status {status}, signal {os.WTERMSIG(status) if os.WIFSIGNALED(status) else '-'})")
    out = json.loads(data)
    out["seconds"] = time.monotonic() - start
    return out


def assert_one_line_error(out: dict, errors: tuple[str, ...], *names: str, match: str | None = None,
                          max_len: int = 1000) -> str:
    """The library's own error (one of `errors`, class names), one line, under `max_len` characters,
    naming each of `names` (a file, an argument); the process intact (pathlib still works)."""
    assert out["path_ok"], "the call changed pathlib for the whole process"
    assert out["error"] in errors, f"{out['error']}: {str(out['message'])[:500]}"
    message = out["message"]
    assert "\n" not in message and "\x1b" not in message, repr(message[:500])
    assert len(message) < max_len, f"{len(message)} characters: {message[:300]}..."
    for name in names:
        assert str(name) in message, message
    if match is not None:
        assert match in message, message
    return message
