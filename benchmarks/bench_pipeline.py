"""Whole-pipeline benchmark: ldm vs diffusers' StableDiffusionPipeline on the CPU, one checkpoint file.

    python benchmarks/bench_pipeline.py [--size 256] [--steps 20] [--threads N] [--checkpoint PATH]

Without --checkpoint it writes a full-size SD 1.x random-weight checkpoint (fp32, 4.3 GB) to a
temporary folder. Each side then runs in its own fresh process (same torch thread count): load
the file, generate one image with CFG (guidance 7.5), the Euler sampler and the same seed, and
report the time per denoising step, the total generation time (text encoder + loop + VAE decode,
loading excluded) and the peak resident memory (VmHWM, loading included). The last lines give
ours / diffusers as ratios (below 1.0: ours is faster or smaller).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(side: str, path: str, size: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    step_times = []
    if side == "ours":
        import ldm

        pipe = ldm.load(path, device="cpu", dtype=torch.float32)
        last = [0.0]

        def cb(i, x, x0):
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now

        t0 = last[0] = time.perf_counter()
        pipe.generate("a dog wearing a hat", steps=steps, scheduler="euler", guidance=7.5, seed=0,
                      height=size, width=size, callback=cb, progress=False)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        import ref_sd
        from ldm import checkpoint, weights

        configs = weights.configs_for(checkpoint.read(path))
        base = ref_sd.load_with_diffusers(path, configs, Path(tempfile.mkdtemp()) / "config")
        pipe = ref_sd.as_pipeline(base, "txt2img", "euler")
        last = [0.0]

        def cb(_p, i, t, tensors):
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
            return {}

        t0 = last[0] = time.perf_counter()
        pipe("a dog wearing a hat", num_inference_steps=steps, guidance_scale=7.5,
             generator=[torch.Generator().manual_seed(0)], height=size, width=size, callback_on_step_end=cb)
    total = time.perf_counter() - t0
    loop = step_times[1:] or step_times  # the first interval includes the text encoder
    return {"side": side, "step_s": sum(loop) / len(loop), "total_s": total, "peak_mib": peak_rss_mib()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint")
    p.add_argument("--worker", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.checkpoint, a.size, a.steps, a.threads)))
        return
    tmp = None
    if a.checkpoint is None:
        from ldm import weights

        tmp = tempfile.TemporaryDirectory()
        a.checkpoint = str(weights.random_checkpoint(Path(tmp.name) / "random-full.safetensors", size="full"))
    rows = {}
    for side in ("diffusers", "ours"):
        out = subprocess.run([sys.executable, __file__, "--worker", side, "--checkpoint", a.checkpoint,
                              "--size", str(a.size), "--steps", str(a.steps), "--threads", str(a.threads)],
                             check=True, capture_output=True, text=True).stdout
        rows[side] = json.loads(out.strip().splitlines()[-1])
    print(f"{a.size}x{a.size}, {a.steps} Euler steps, CFG 7.5, fp32, {a.threads} threads")
    print(f"{'':10} {'s/step':>8} {'total s':>8} {'peak MiB':>9}")
    for side, r in rows.items():
        print(f"{side:10} {r['step_s']:8.2f} {r['total_s']:8.1f} {r['peak_mib']:9.0f}")
    o, d = rows["ours"], rows["diffusers"]
    print(f"{'ratio':10} {o['step_s'] / d['step_s']:8.2f} {o['total_s'] / d['total_s']:8.2f} "
          f"{o['peak_mib'] / d['peak_mib']:9.2f}   (ours / diffusers)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
