"""The device to run on and its default precision, how much memory a generation needs there, and whether it fits.

    device = check_device(None)                        cuda if present, else cpu; DeviceError if absent
    default_device_dtype(None, "auto")                 (cuda, fp16), or (cpu, bf16 where native, else fp32)
    dev, host = working_memory(pipe.unet.cfg, pipe.vae.cfg, 512, 512, num_images=4)   bytes at the peak
    available_memory(device)                           free bytes on the GPU, or of the host's RAM
    check_fits(pipe, 512, 512, 4, "--size 512x512")    DoesNotFit naming the limit, else nothing
    tune_allocator()                                   glibc keeps large freed blocks (ldm.load calls it)

A run that cannot finish should fail in seconds with the limit, not minutes later with a crash:
the `ldm` command (ldm.cli) calls these before any sampling and prints their error as its one line.
Both errors are ValueErrors whose message is that line. The model of working memory is measured on
this library's classes (see UNET_WORKING_TENSORS); it is an estimate of the peak, not a bound.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from pathlib import Path

import torch

__all__ = ["AUTO_TILE_LATENT", "DeviceError", "DoesNotFit", "check_device", "cpu_has_native_bf16", "default_device_dtype", "UNET_WORKING_TENSORS", "VAE_WORKING_TENSORS",
           "working_memory", "available_memory", "check_fits", "tune_allocator", "MALLOC_MMAP_THRESHOLD",
           "MALLOC_TRIM_THRESHOLD"]

log = logging.getLogger(__name__)


AUTO_TILE_LATENT = 64  # the pipeline tiles the VAE decode above 64x64 latents (512x512 pixels), tiles of this size


class DeviceError(ValueError):
    """A device this machine does not have; the message names it and what to use instead."""


class DoesNotFit(ValueError):
    """A generation larger than the device's (or host's) free memory; the message names the limit."""


def check_device(device: torch.device | None, label: str = "--device") -> torch.device:
    """The device to run on (default: cuda if present), or DeviceError if this machine lacks it.
    label: how the caller names the option in the error ("--device cuda: CUDA is not available ...")."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"{label} {device}: CUDA is not available ({why}); use {label} cpu")
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise DeviceError(f"{label} {device}: this machine has {n} CUDA device{'s' if n > 1 else ''} "
                              f"(cuda:0 to cuda:{n - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{label} {device}: Apple's MPS is not available on this machine; use {label} cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """Does this CPU compute in bf16 natively (AVX512-BF16 or AMX), so that bf16 matmuls and
    convolutions run faster than fp32 instead of being emulated (and slower)?"""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty elsewhere: no bf16 claimed)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def default_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """CUDA with fp16 when there is a GPU, else the CPU with fp32; either can be forced.

    dtype="auto": fp16 on CUDA; on the CPU bf16 where the CPU has native bf16 (cpu_has_native_bf16),
    else fp32. (load() keeps the VAE in fp32 under fp16, which its decoder overflows; bf16 has fp32's
    range, and a bf16 VAE moved the shipped model's images by 0.04-0.11 of 255 on average against an
    fp32 VAE's, and made a 3-step image 1.3x (Zen 4) to 1.9x (Xeon AMX) faster: README, benchmarks/results.)
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else \
            torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype={dtype!r} is not supported; use torch.float32, torch.float16, torch.bfloat16 "
                         f"or 'auto'")
    return device, dtype


# Working memory of a run, from the networks' widths. Measured as the rise of VmHWM over one forward
# pass of this library's classes (fp32, CPU): the UNet holds its skip connections plus 10-29 tensors
# as wide as its first level per batch row (SD 1.x at a 64x64 latent: 29; the tiny config at 64-128:
# 10-23), the VAE decoder 3.3-4.5 tensors as wide as its full-resolution upsample per image (or
# tile); the encoder (img2img, inpaint) is taken to hold as many at its first level's width, untiled.
# The weights are not counted: they are already loaded when the check runs.
UNET_WORKING_TENSORS = 24
VAE_WORKING_TENSORS = 4


def working_memory(unet_cfg, vae_cfg, height: int, width: int, num_images: int = 1, *, steps: int = 25,
                   guidance: float = 7.5, dtype: torch.dtype = torch.float32,
                   vae_dtype: torch.dtype = torch.float32, tile: bool | None = None,
                   encode: bool = False) -> tuple[int, int]:
    """About how many bytes generating num_images height x width images holds at its peak:
    (on the device, on the host for the PIL conversion). On the CPU the two add up."""
    f = vae_cfg.downsample_factor
    B, P = num_images, height * width  # images, pixels per image
    h, w = height // f, width // f
    p = h * w  # latent pixels per image
    size, vsize = torch.finfo(dtype).bits // 8, torch.finfo(vae_dtype).bits // 8
    # kept all run long: the x0 prediction of every step (Result.x0_preds) and a few float32 latents
    kept = (steps + 4) * B * vae_cfg.embed_dim * p * 4
    # the UNet, per batch row (two per image with classifier-free guidance)
    mc, mults, n = unet_cfg.model_channels, unet_cfg.channel_mult, unet_cfg.num_res_blocks
    skips = mc + sum(n * mc * m / 4**i + (mc * m / 4**(i + 1) if i < len(mults) - 1 else 0)
                     for i, m in enumerate(mults))  # channels x (latent pixels) held for the way up
    rows = 2 * B if guidance != 1.0 else B
    unet = rows * p * (skips + UNET_WORKING_TENSORS * mc) * size
    # the VAE: one image (or one tile) at a time, next to the float32 images decoded so far
    tiled = tile or (tile is None and max(h, w) > AUTO_TILE_LATENT)
    tile_pixels = min(P, (AUTO_TILE_LATENT * f) ** 2) if tiled else P
    wide = vae_cfg.ch * vae_cfg.ch_mult[1 if len(vae_cfg.ch_mult) > 1 else 0]
    vae = VAE_WORKING_TENSORS * wide * tile_pixels * vsize + 2 * 12 * B * P + (28 * P if tiled else 0)
    if encode:
        vae = max(vae, VAE_WORKING_TENSORS * vae_cfg.ch * vae_cfg.ch_mult[0] * P * vsize)
    host = 42 * B * P  # images.to_pil: the float32 images, two float temporaries, uint8 array, PIL copy
    return int(kept + max(unet, vae)), int(host)


def available_memory(device: torch.device) -> int | None:
    """Free bytes on the device (CUDA), else of the host's RAM (None if this system does not say)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = None
    try:
        with open("/proc/meminfo") as f:  # Linux: what can be had without swapping
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # macOS has no SC_AVPHYS_PAGES: the total, then
            try:
                free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            except (AttributeError, ValueError, OSError):
                return None
    try:  # a container's cgroup limit (v2) can be far below the machine's RAM
        limit, used = (Path("/sys/fs/cgroup", n).read_text().strip() for n in ("memory.max", "memory.current"))
        if limit != "max":
            free = min(free, int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return free


def check_fits(pipe, height: int, width: int, num_images: int, size_arg: str, *,
               count_arg: str = "--num-images", **kw) -> None:
    """DoesNotFit naming the limit if the run would not fit in the device's (and host's) free memory.

    pipe: a Pipeline (its networks' configs, dtypes, device and smallest size); kw: working_memory's
    (steps, guidance, tile, encode). size_arg and count_arg name the size and the image count in the
    message as the caller's user gave them ("--size 512x512", "--num-images")."""
    device = pipe.device

    def fits(h: int, w: int, n: int) -> bool:
        dev, host = working_memory(pipe.unet.cfg, pipe.vae.cfg, h, w, n, dtype=pipe.dtype,
                                   vae_dtype=pipe.vae_dtype, **kw)
        if device.type == "cuda":
            return dev <= free and (host_free is None or host <= host_free)
        return dev + host <= free

    free = available_memory(device)
    host_free = available_memory(torch.device("cpu")) if device.type == "cuda" else None
    if free is None or fits(height, width, num_images):
        return
    dev, host = working_memory(pipe.unet.cfg, pipe.vae.cfg, height, width, num_images, dtype=pipe.dtype,
                               vae_dtype=pipe.vae_dtype, **kw)
    if device.type != "cuda":
        need, where = dev + host, f"this machine has {free / 2**30:.1f} GiB of RAM free"
    elif dev > free:
        need, where = dev, f"{device} has {free / 2**30:.1f} GiB free"
    else:  # the GPU holds it but the host's RAM cannot take the PIL conversion
        need, where = host, f"this machine has {host_free / 2**30:.1f} GiB of RAM free"
    what = f"{num_images} images of {width}x{height} need" if num_images > 1 else f"an image of {width}x{height} needs"
    what = f"{what} about {need / 2**30:.1f} GiB"
    if num_images > 1 and fits(height, width, 1):
        lo, hi = 1, num_images  # fits(lo), not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(height, width, mid) else (lo, mid)
        raise DoesNotFit(f"{count_arg} {num_images}: {what} and {where}; at most {lo} fit at this size")
    m = pipe.vae.cfg.downsample_factor
    lo, hi = 0, max(height, width) // m  # sides in units of m: fits(lo) (or lo = 0), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * m, mid * m, 1) else (lo, mid)
    largest = f"the largest that fits is about {lo * m}x{lo * m}" if lo * m >= pipe.min_size \
        else "not even the smallest image fits"
    if size_arg.startswith("--image") and lo * m >= pipe.min_size:
        largest += " (--size resizes the image)"
    raise DoesNotFit(f"{size_arg}: {what} and {where}; {largest}")


# glibc's malloc serves a block above its mmap threshold (128 KiB at start, raised as blocks are freed,
# to 32 MiB at most) with a fresh mmap and hands it back to the kernel on free, and trims the heap's
# free top above its trim threshold. A UNet step allocates and frees hundreds of activations of
# 2-130 MB, so every step faults their pages in again: full-size SD 1.x at 256x256 (batch 2) took
# ~460k minor page faults and 0.75 s of system time per fp32 step on a 2-core Xeon (0.12 s in bf16).
# With these thresholds the freed blocks stay in the heap and are reused: that step ran 1.18x faster
# in fp32 (1.08x at 512x512, 1.06x in bf16 at 256), peak memory +0-0.2 GiB, the resident memory left
# after a step or an image +0.1-0.4 GiB. benchmarks/bench_cpu.py measures it, a process with and one
# without, in the same run (the README's performance section has the table).
MALLOC_MMAP_THRESHOLD = 256 * 2**20  # blocks below this come from the heap and go back to it
MALLOC_TRIM_THRESHOLD = 2**30        # free memory the heap may keep at its top before returning it
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc's malloc.h)
_tuned: bool | None = None


def tune_allocator(mmap_threshold: int = MALLOC_MMAP_THRESHOLD, trim_threshold: int = MALLOC_TRIM_THRESHOLD) -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process (mallopt), once; True if applied.

    A no-op (False) off Linux/glibc (macOS, Windows, musl), when the environment already sets malloc's
    tunables (GLIBC_TUNABLES with glibc.malloc, MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_: the
    user's choice wins), or with LDM_TUNE_ALLOCATOR=0. It is process-wide and stays: freed blocks are
    kept for reuse (up to trim_threshold at the heap's top), so the process's resident memory after a
    generation stays higher (+0.1-0.4 GiB for SD 1.x at 256-512 px), and available_memory counts it
    as used. ldm.load calls it after the weights are in place, so load's temporaries still go back."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    env = os.environ
    if env.get("LDM_TUNE_ALLOCATOR", "1") == "0":
        log.debug("tune_allocator: LDM_TUNE_ALLOCATOR=0, malloc left as it is")
    elif "glibc.malloc." in env.get("GLIBC_TUNABLES", "") or \
            any(k in env for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        log.debug("tune_allocator: malloc's tunables are set in the environment; left as they are")
    elif sys.platform.startswith("linux") and _glibc():
        try:
            libc = ctypes.CDLL("libc.so.6")
            _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold))) and \
                bool(libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold)))
        except (OSError, AttributeError) as e:
            log.debug("tune_allocator: mallopt unavailable (%s)", e)
        log.debug("tune_allocator: mmap threshold %d, trim threshold %d: %s", mmap_threshold, trim_threshold,
                  "applied" if _tuned else "refused")
    return _tuned


def _glibc() -> bool:
    """Is this process's C library glibc (the one whose mallopt takes these parameters)?"""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # musl and others do not know the name
        return False
