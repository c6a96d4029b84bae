"""The UNet through torch.compile: an opt-in speed lever.

    pipe = ldm.load(path, compile=True)          # or: ldm generate ... --compile
    compile_unet(pipe.unet); uncompile_unet(pipe.unet)

What it does. The UNet's forward runs through torch.compile with inductor's `freezing`: the weights
become constants of the compiled graph, so inductor prepares them once (convolution weights in
oneDNN's blocked layout, linear weights packed for the BLAS) instead of at every call, and fuses the
elementwise work around the matmuls (GroupNorm + SiLU, the bias and residual adds, GEGLU) into a few
loops. The module stays what it was: the same object, the same state_dict keys, the eager forward
beside it (`uncompile_unet` puts it back); only `unet.forward` is replaced, by a CompiledForward.

What it costs. The first call at each input shape compiles: a minute or two for SD 1.x on a CPU
core, during which the first step of the progress bar stands still; a line above the bar says that
it is compiling and, after, how long it took. A new image size, batch (num_images; guidance 1 runs
half the batch) or dtype compiles again (dynamic=False: each shape gets code specialised to it).
Inductor writes C++ on the CPU and compiles it, so a C++ compiler must be installed; where compiling
fails (no compiler, an op inductor cannot lower) a line says why and the UNet runs eager from then on.

Frozen weights are a snapshot, and dynamo's guards check a tensor's shape, not its values. So each
call compares the weights with the snapshot's (every parameter's storage and version counter, which
an in-place change bumps, and the modules' hooks: pipe.load_lora swaps merged weights in,
unload_loras swaps the originals back, merge=False hooks) and, when they differ, clears torch's
compile caches (torch.compiler.reset(), process-wide) and compiles again: compiled output never
comes from stale weights. Training (grad enabled) runs the eager forward: freezing is for inference.

When it pays. It saves the same fraction of every step at one shape, so it pays after about
compile seconds / seconds saved per step: not for a one-off 20-step image from the command line,
but for a notebook or a server that draws many images at one size. benchmarks/bench_cpu.py
(--compile) measures the saving beside eager ldm and diffusers; the README has the numbers.
"""
from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable

import torch
import torch._inductor.config as inductor_config
from torch import nn
from tqdm.auto import tqdm

__all__ = ["CompiledForward", "check_flag", "compile_unet", "uncompile_unet", "is_compiled"]


class CompiledForward:
    """unet.forward while compiled: eager under autograd; otherwise the compiled forward, compiled
    afresh whenever the weights changed in place since the last compile."""

    def __init__(self, unet: nn.Module, notify: Callable[[str], None] | None = None):
        self.unet = unet
        self.eager = type(unet).forward.__get__(unet)  # the class's forward, bound: what compile traces
        self.notify = notify or (lambda msg: tqdm.write(msg, file=sys.stderr))  # above a running progress bar
        self.compiled: Callable | None = None
        self.frozen: tuple = ()  # the weights' (id, version) when they were frozen
        self.shapes: set = set()  # the input signatures compiled since then
        self.compiles = 0
        self.failed = ""  # why compiling failed, if it did: then every call runs eager

    def weights_key(self) -> tuple:
        """What the frozen graph depends on: each parameter's and buffer's identity, storage and version
        counter (an in-place update bumps the counter; `param.data = ...`, how ldm.lora merges, changes
        the storage) and the modules' forward hooks (how an unmerged LoRA runs)."""
        tensors = tuple((id(p), p.data_ptr(), p._version)
                        for p in itertools.chain(self.unet.parameters(), self.unet.buffers()))
        hooks = tuple(id(h) for m in self.unet.modules()
                      for h in itertools.chain(m._forward_hooks.values(), m._forward_pre_hooks.values()))
        return tensors, hooks

    def __call__(self, x: torch.Tensor, t, context: torch.Tensor | None = None, y: torch.Tensor | None = None,
                 *, attention_backend: str | None = None) -> torch.Tensor:
        if torch.is_grad_enabled():  # training, or a caller who wants gradients: frozen weights would be wrong
            return self.eager(x, t, context, y, attention_backend=attention_backend)
        key = self.weights_key()
        if self.compiled is None or key != self.frozen:
            # dynamo's cached code holds the old weights as constants, and its guards check tensors' shapes,
            # not their values: clear its caches (process-wide, torch's public reset), then compile afresh
            if self.compiled is not None:
                torch.compiler.reset()
            self.compiled = torch.compile(self.eager, dynamic=False)
            self.frozen, self.shapes = key, set()
        signature = tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
                          for a in (x, t, context, y)) + (attention_backend or self.unet.attention_backend,)
        if signature in self.shapes:
            with inductor_config.patch(freezing=True):
                return self.compiled(x, t, context, y, attention_backend=attention_backend)
        if self.failed:
            return self.eager(x, t, context, y, attention_backend=attention_backend)
        self.notify(f"ldm: compiling the UNet for x {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} "
                    "(torch.compile, the first call at this shape: a minute or two on a CPU)")
        t0 = time.perf_counter()
        try:
            # freezing is read while compiling, from inductor's config: patched here, not process-wide (as a
            # torch.compile(options=) entry it is not applied: the weights stayed live inputs, measured)
            with inductor_config.patch(freezing=True):
                out = self.compiled(x, t, context, y, attention_backend=attention_backend)
        except Exception as e:  # no C++ compiler, an op inductor cannot lower, ...: the eager forward from now on
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            self.notify(f"ldm: torch.compile failed ({self.failed}); the UNet runs eager")
            return self.eager(x, t, context, y, attention_backend=attention_backend)  # a bad input raises here
        self.shapes.add(signature)
        self.compiles += 1
        self.notify(f"ldm: compiled in {time.perf_counter() - t0:.0f} s; calls at this shape now run compiled")
        return out


def check_flag(compile, name: str = "compile") -> bool:
    """A compile= argument: True or False, nothing that merely looks like one ("no" is truthy)."""
    if not isinstance(compile, bool):
        raise TypeError(f"{name}={compile!r}: must be True or False")
    return compile


def compile_unet(unet: nn.Module, notify: Callable[[str], None] | None = None) -> CompiledForward:
    """Route unet(...) through torch.compile (freezing) from now on; returns the CompiledForward."""
    if not callable(getattr(type(unet), "forward", None)) or not hasattr(unet, "attention_backend"):
        raise TypeError(f"compile_unet: expected an ldm UNetModel, got {type(unet).__name__}")
    if is_compiled(unet):
        return unet.forward
    unet.forward = CompiledForward(unet, notify)  # an instance attribute: nn.Module.__call__ calls it
    return unet.forward


def uncompile_unet(unet: nn.Module) -> None:
    """The eager forward again (a no-op when not compiled)."""
    if is_compiled(unet):
        del unet.forward


def is_compiled(unet: nn.Module) -> bool:
    return isinstance(unet.__dict__.get("forward"), CompiledForward)
