"""The LCM-LoRA job (4 steps, guidance 1) against 25 Euler steps at guidance 7.5, full-size SD 1.x.

    python benchmarks/bench_lcm.py [--dir /tmp/ldm-bench-lcm] [--num-images 4] [--threads 0]

No real weights reach this machine, so both files are random, in the real layouts: a full-size
SD 1.x single file (`ldm random-checkpoint --size full --dtype fp16`) and a LoRA shaped like
latent-consistency/lcm-lora-sdv1-5 (tests/ref_lora.py: kohya keys, 278 modules, rank 64). The
pictures are noise; the work per image is what real weights would do. It runs, in one process:

  lcm    ldm generate PROMPT --lora LCM --scheduler lcm --steps 4 --guidance 1 --num-images N
         (the command itself, through ldm.cli.main; seconds per image from its wall time, LoRA
         merge and model load excluded by timing a second call on the loaded pipeline too)
  euler  the same pipeline without the LoRA: 25 Euler steps at guidance 7.5 (two UNet passes a
         step, batched), one image

and prints seconds per image for each, the ratio, and UNet evaluations per image (4 vs 50).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import ldm  # noqa: E402
import ref_lora  # noqa: E402
from ldm import cli  # noqa: E402
from ldm.unet import UNetConfig, UNetModel  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/ldm-bench-lcm")
    ap.add_argument("--num-images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, lcm = folder / "sd15-random-full-fp16.safetensors", folder / "lcm-lora-sdv1-5-shaped.safetensors"
    if not ckpt.exists():
        assert cli.main(["random-checkpoint", str(ckpt), "--size", "full", "--dtype", "fp16"]) == 0
    if not lcm.exists():
        with torch.device("meta"):
            shapes_only = UNetModel(UNetConfig())  # only the weights' shapes are read
        ref_lora.write_lcm_shaped(lcm, shapes_only)
    print(f"{torch.get_num_threads()} threads; checkpoint {ckpt.stat().st_size / 1e9:.2f} GB, "
          f"LoRA {lcm.stat().st_size / 1e6:.1f} MB")

    # 1. the command exactly as a user types it (load + merge + sample + decode + write)
    out = folder / "outputs"
    t = time.perf_counter()
    rc = cli.main(["generate", PROMPT, "--checkpoint", str(ckpt), "--lora", str(lcm), "--scheduler", "lcm",
                   "--steps", "4", "--guidance", "1", "--num-images", str(args.num_images), "--seed", "0",
                   "--out", str(out), "-q"])
    command_s = time.perf_counter() - t
    assert rc == 0, rc

    # 2. per image on a loaded pipeline: LCM-LoRA 4 steps vs 25 Euler steps
    pipe = ldm.load(ckpt, device="cpu", dtype=torch.float32)
    pipe.load_lora(lcm)
    t = time.perf_counter()
    pipe(PROMPT, scheduler="lcm", steps=4, guidance=1.0, num_images=args.num_images, seed=0, progress=False)
    lcm_s = (time.perf_counter() - t) / args.num_images
    pipe.unload_loras()
    t = time.perf_counter()
    pipe(PROMPT, scheduler="euler", steps=25, guidance=7.5, seed=0, progress=False)
    euler_s = time.perf_counter() - t

    print(f"\nthe command (load, merge 278 modules, {args.num_images} images, write): {command_s:.1f} s")
    print(f"{'job':34s} {'UNet evals/image':>17s} {'s/image':>8s}")
    print(f"{'LCM-LoRA, lcm 4 steps, guidance 1':34s} {4:17d} {lcm_s:8.1f}")
    print(f"{'euler 25 steps, guidance 7.5':34s} {50:17d} {euler_s:8.1f}")
    print(f"euler / lcm: {euler_s / lcm_s:.1f}x (seconds per image, VAE decode included in both)")


if __name__ == "__main__":
    main()
