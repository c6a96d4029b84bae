"""Load a full-size SD 1.x single file: ldm vs diffusers' from_single_file, same run.

    python benchmarks/bench_load.py [--dtype fp32 fp16] [--repeats 2] [--dir /tmp/ldm-bench-load]

Writes a full-size random-weight SD 1.x single file (4.3 GB fp32 / 2.1 GB fp16) once, then
loads it in a fresh subprocess per measurement (so peak RSS is honest and nothing is cached in
the interpreter; the OS page cache is warm for both after the first read):

  ldm       ldm.checkpoint.read(path) + ldm.weights.build(ck) + CLIPTokenizer()
            (strict loading of all three networks, and the tokenizer, as diffusers does)
  diffusers StableDiffusionPipeline.from_single_file(path, config=<local folder>,
            local_files_only=True)   (accelerate installed: meta-device init)

Both keep the file's dtype (diffusers gets torch_dtype to match). After loading, every weight is
read once (as a first forward pass would), so memory-mapped weights count in RSS for both.
Prints wall time (to 'loaded' and to 'ready') and peak RSS (the child's VmHWM) for each, and
ours / diffusers ratios.
Needs the test extra (diffusers, transformers, accelerate); run from the repository root.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads({threads})
t0 = time.perf_counter()
if {which!r} == "ldm":
    from ldm import checkpoint, weights
    from ldm.tokenizer import CLIPTokenizer
    ck = checkpoint.read({path!r})
    models = weights.build(ck)
    tokenizer = CLIPTokenizer()  # diffusers' pipeline loads its tokenizer too
else:
    import ref_sd
    from pathlib import Path
    from diffusers.utils import logging as dlog
    from ldm.clip import CLIPTextConfig
    from ldm.unet import UNetConfig
    from ldm.vae import VAEConfig
    dlog.disable_progress_bar()
    configs = {{"text_encoder": CLIPTextConfig(), "unet": UNetConfig(), "vae": VAEConfig()}}
    dtype = torch.float16 if "fp16" in {path!r} else torch.float32  # keep the file's dtype, as ldm does
    pipe = ref_sd.load_with_diffusers(Path({path!r}), configs, Path({path!r} + ".config"), torch_dtype=dtype)
    models = (pipe.text_encoder, pipe.unet, pipe.vae)
loaded = time.perf_counter() - t0
# Touch every weight once (what the first forward pass does): memory-mapped weights count in
# RSS only once read, so this makes the two loaders' peak RSS comparable and honest.
n = 0
with torch.no_grad():
    for m in models:
        for p in m.parameters():
            p.sum()
            n += p.numel()
seconds = time.perf_counter() - t0
# VmHWM: this process's own peak RSS. (ru_maxrss would also count the parent's RSS at fork.)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"loaded": loaded, "seconds": seconds, "peak_rss_mib": hwm / 1024, "params": n}}))
"""


def measure(which: str, path: Path, threads: int) -> dict:
    code = CHILD.format(which=which, path=str(path), tests=str(ROOT / "tests"), threads=threads)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{which} load failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/ldm-bench-load")
    args = ap.parse_args()

    import torch
    from ldm import weights

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.dtype:
        path = out / f"sd15-random-{name}.safetensors"
        if not path.exists():
            print(f"writing {path} ...", flush=True)
            weights.random_checkpoint(path, size="full",
                                      dtype={"fp32": torch.float32, "fp16": torch.float16}[name])
        size_gib = path.stat().st_size / 2**30
        res = {}
        for which in ("ldm", "diffusers"):
            runs = [measure(which, path, args.threads) for _ in range(args.repeats)]
            res[which] = {"seconds": statistics.median(r["seconds"] for r in runs),
                          "loaded": statistics.median(r["loaded"] for r in runs),
                          "rss": max(r["peak_rss_mib"] for r in runs), "params": runs[0]["params"]}
        assert res["ldm"]["params"] == res["diffusers"]["params"], res
        rows.append((name, size_gib, res))

    print(f"\nload a full-size SD 1.x single file; median of {args.repeats} fresh processes, "
          f"{args.threads} threads, torch {torch.__version__}")
    print("'load' = the loader returns; 'ready' = and every weight has been read once; "
          "RSS = peak resident memory (VmHWM) at 'ready'")
    print(f"{'file':<6} {'GiB':>5} | {'ldm load':>8} {'diff load':>9} {'ratio':>6} | {'ldm ready':>9} "
          f"{'diff ready':>10} {'ratio':>6} | {'ldm RSS MiB':>11} {'diff RSS MiB':>12} {'ratio':>6}")
    for name, size, r in rows:
        a, b = r["ldm"], r["diffusers"]
        print(f"{name:<6} {size:>5.2f} | {a['loaded']:>8.2f} {b['loaded']:>9.2f} "
              f"{a['loaded'] / b['loaded']:>6.2f} | {a['seconds']:>9.2f} {b['seconds']:>10.2f} "
              f"{a['seconds'] / b['seconds']:>6.2f} | {a['rss']:>11.0f} {b['rss']:>12.0f} "
              f"{a['rss'] / b['rss']:>6.2f}")


if __name__ == "__main__":
    main()
