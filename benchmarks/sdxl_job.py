"""The source document's job, on random full-size SDXL-layout files: time and peak memory.

    python benchmarks/sdxl_job.py --dir /tmp/sdxl-job            # writes the two files once, then runs the job
    python benchmarks/sdxl_job.py --dir /tmp/sdxl-job --dtype fp16 --device cuda    # on a GPU machine

The job (one of ldm's source documents ends with it, in diffusers): SDXL base, the LCM-LoRA for SDXL,
LCMScheduler, 4 steps, guidance 1, 4 images per prompt at 1024x1024, a fixed negative prompt, a seed
from the clock. In ldm it is one command:

    ldm generate PROMPT --checkpoint sdxl.safetensors --lora lcm-lora-sdxl.safetensors --scheduler lcm \\
        --steps 4 --guidance 1 --num-images 4 --size 1024x1024 \\
        --negative "low quality, blurry, text, watermark" --out outputs/

No real weights reach this machine, so both files are random in the real layouts: `ldm random-checkpoint
--family sdxl --size full` (2514 tensors, 2.57 billion UNet parameters) and a kohya LoRA with the
LCM-LoRA for SDXL's exact keys and shapes (788 UNet modules in diffusers block names, rank 64, fp16,
alpha in the file; tests/ref_lora.lcm_sdxl_shaped). The images are noise; the time and memory are the
job's. The command runs in a child process; its peak resident memory is the child's ru_maxrss.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

NEGATIVE = "low quality, blurry, text, watermark"


def write_lora(path: Path, seed: int = 0) -> None:
    """A random LoRA with the LCM-LoRA for SDXL's keys and shapes (small values: the UNet stays finite)."""
    import torch
    from safetensors.torch import save_file

    import ref_lora
    from ldm import families
    from ldm.unet import UNetModel

    with torch.device("meta"):
        unet = UNetModel(families.get("sdxl").configs["unet"])
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, t in ref_lora.lcm_sdxl_shaped(unet).items():
        sd[key] = t if t.device.type != "meta" else (torch.randn(t.shape, generator=g) * 1e-3).to(t.dtype)
    save_file(sd, str(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/sdxl-job"))
    p.add_argument("--dtype", default="bf16", help="the UNet's and text towers' (the VAE stays fp32 under fp16)")
    p.add_argument("--device", default=None)
    p.add_argument("--prompt", default="a photograph of a lighthouse at dusk")
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    ckpt, lora = args.dir / "sdxl-random-full.safetensors", args.dir / "lcm-lora-sdxl-random.safetensors"
    if not ckpt.exists():
        subprocess.run([sys.executable, "-m", "ldm.cli", "random-checkpoint", str(ckpt), "--family", "sdxl",
                        "--size", "full", "--dtype", "bf16"], check=True)
    if not lora.exists():
        write_lora(lora)
    out = args.dir / "outputs"
    cmd = [sys.executable, "-m", "ldm.cli", "generate", args.prompt, "--checkpoint", str(ckpt), "--lora", str(lora),
           "--scheduler", "lcm", "--steps", "4", "--guidance", "1", "--num-images", "4", "--size", "1024x1024",
           "--negative", NEGATIVE, "--out", str(out), "--dtype", args.dtype]
    if args.device:
        cmd += ["--device", args.device]
    load = os.getloadavg()
    start = time.perf_counter()
    run = subprocess.run(cmd)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    print(f"job: exit {run.returncode}, {seconds / 60:.1f} min, peak resident {peak:.1f} GiB, "
          f"load average before {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, after {os.getloadavg()[0]:.1f}")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
