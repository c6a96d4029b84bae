"""Time the full-size SD 1.x stages, ours against diffusers, on the same random weights.

    python benchmarks/bench_unet_vae.py                     # every case in CASES
    python benchmarks/bench_unet_vae.py --only unet-64 --repeats 1 --threads 2

Each (case, implementation) runs in a fresh subprocess, so its memory is its own. In the child:
build the model with seeded random weights (tests/ref_unet.py: ours on the meta device,
materialised once, diffusers given the same tensors through its own checkpoint converter),
then, under torch.inference_mode and the same thread count for both:
  1. reset the peak-RSS mark (`echo 5 > /proc/self/clear_refs`, Linux), run the FIRST forward,
     read the mark (VmHWM): "forward MiB" is that peak minus the RSS just before the forward,
     so building the model never counts, and "peak RSS MiB" is the mark itself (weights included);
  2. run `repeats` more forwards. "best s" is the fastest of all forwards (the first
     included), "median s" their median, over every round.
The implementations alternate (ours, diffusers, ours, ...) over `--rounds` rounds so that a
change in the machine's load hits both; the memory printed is the smallest over the rounds.
On a shared machine whose load drifts, `--paired N` adds a sturdier time ratio: one more
process builds both models on the same tensors, runs one forward of each to warm up, then N
alternating pairs (ours, reference), and reports the median of the N per-pair ratios.
Needs diffusers (the test extra).

Adding a stage: write `build_<stage>(impl, case) -> callable` returning a function that runs one
forward, register it in BUILDERS, and append its cases to CASES.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # ref_<stage>: the reference builders


@dataclass(frozen=True)
class Case:
    name: str          # what --only selects
    stage: str         # key of BUILDERS
    batch: int
    size: int          # latent side (the image is 8x larger)
    repeats: int = 2   # timed forwards after the first


CASES = [
    Case("unet-32", "unet", batch=2, size=32, repeats=3),   # 256x256 images, a CFG batch of one prompt
    Case("unet-64", "unet", batch=2, size=64, repeats=2),   # 512x512
]


@functools.lru_cache(maxsize=None)
def _unet_weights():
    """Our full-size UNet with seeded random weights; built once per process."""
    import ref_unet
    from ldm.unet import UNetConfig
    return ref_unet.ours(UNetConfig(), seed=0)


def build_unet(impl: str, case: Case):
    """One UNet forward: eps for a (batch, 4, size, size) latent, t = 500, a 77x768 context."""
    import torch

    import ref_unet

    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch, 4, case.size, case.size, generator=g)
    context = torch.randn(case.batch, 77, 768, generator=g)
    t = torch.full((case.batch,), 500)
    ours = _unet_weights()
    if impl == "diffusers":
        ref = ref_unet.to_diffusers(ours)     # the same tensors, diffusers' modules
        return lambda: ref(x, t, encoder_hidden_states=context).sample
    backend = impl.split(":")[1] if ":" in impl else "auto"   # "ours:math" times the math path
    return lambda: ours(x, t, context, attention_backend=backend)


BUILDERS = {"unet": build_unet}
IMPLS = {"unet": ["ours", "diffusers"]}


def build_vae(impl: str, case: Case):
    """One VAE decode: an unscaled (batch, 4, size, size) latent -> (batch, 3, 8 size, 8 size)."""
    import torch

    import ref_vae
    from ldm.vae import SCALING_FACTOR, VAEConfig

    g = torch.Generator().manual_seed(0)
    z = torch.randn(case.batch, 4, case.size, case.size, generator=g) / SCALING_FACTOR
    ours = ref_vae.ours(VAEConfig(), seed=0)
    if impl == "diffusers":
        ref = ref_vae.to_diffusers(ours)      # the same tensors, diffusers' modules
        return lambda: ref.decode(z).sample
    return lambda: ours.decode(z)


# The VAE decode, one run per case (a 64x64 latent takes ~20 s on 2 cores); --repeats adds more.
CASES += [
    Case("vae-32", "vae", batch=1, size=32, repeats=0),      # 256x256 image
    Case("vae-64", "vae", batch=1, size=64, repeats=0),      # 512x512
]
BUILDERS["vae"] = build_vae
IMPLS["vae"] = ["ours", "diffusers"]


def status_mib(field: str) -> float:
    """A line of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_child(case: Case, impl: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    forward = BUILDERS[case.stage](impl, case)
    with torch.inference_mode():
        before = status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                   # reset VmHWM to the current RSS
        t0 = time.perf_counter()
        out = forward()
        times = [time.perf_counter() - t0]
        peak = status_mib("VmHWM")
        for _ in range(case.repeats):
            t0 = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t0)
    return {"case": case.name, "impl": impl, "times_s": times,
            "rss_before_mib": before, "peak_rss_mib": peak, "forward_mib": peak - before,
            "out": list(out.shape), "threads": threads}


def run_paired(case: Case, threads: int, pairs: int) -> dict:
    """In one process: ours and the reference on the same tensors, alternating forwards."""
    import torch

    torch.set_num_threads(threads)
    ours, ref = (BUILDERS[case.stage](impl, case) for impl in IMPLS[case.stage])
    ratios, times = [], {"ours": [], "reference": []}
    with torch.inference_mode():
        ours(), ref()                                      # warm-up
        for _ in range(pairs):
            t0 = time.perf_counter()
            ours()
            t1 = time.perf_counter()
            ref()
            t2 = time.perf_counter()
            times["ours"].append(t1 - t0)
            times["reference"].append(t2 - t1)
            ratios.append((t1 - t0) / (t2 - t1))
    return {"case": case.name, "impl": "paired", "ratios": ratios, **{f"{k}_s": v for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="case names (default: all): " + ", ".join(c.name for c in CASES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--repeats", type=int, default=None, help="override every case's repeats")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per case")
    parser.add_argument("--impls", nargs="+", help="implementations (default: ours and the reference)")
    parser.add_argument("--math", action="store_true", help="also time our math attention path (ours:math)")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="also time N alternating (ours, reference) pairs in one process")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)   # internal: JSON {case, impl, threads}
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        if spec["impl"] == "paired":
            print(json.dumps(run_paired(Case(**spec["case"]), spec["threads"], spec["pairs"])))
        else:
            print(json.dumps(run_child(Case(**spec["case"]), spec["impl"], spec["threads"])))
        return

    import torch
    threads = args.threads or torch.get_num_threads()
    cases = [c for c in CASES if not args.only or c.name in args.only]
    print(f"full-size SD 1.x, random weights, {threads} threads, torch {torch.__version__}, "
          f"one fresh process per measurement")
    print(f"{'case':>10} {'impl':>10} {'best s':>8} {'median s':>9} {'peak RSS MiB':>13} {'forward MiB':>12}")
    results = []
    for case in cases:
        if args.repeats is not None:
            case = Case(**{**asdict(case), "repeats": args.repeats})
        impls = args.impls or IMPLS[case.stage] + (["ours:math"] if args.math and case.stage == "unet" else [])
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for impl in impls:
                spec = json.dumps({"case": asdict(case), "impl": impl, "threads": threads})
                run = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
                if run.returncode:
                    raise RuntimeError(f"{case.name} {impl} failed:\n{run.stderr}")
                r = json.loads(run.stdout.strip().splitlines()[-1])
                results.append(r)
                b = best.setdefault(impl, {"times_s": [], "peak_rss_mib": r["peak_rss_mib"],
                                           "forward_mib": r["forward_mib"]})
                b["times_s"] += r["times_s"]
                for key in ("peak_rss_mib", "forward_mib"):
                    b[key] = min(b[key], r[key])
        for impl, b in best.items():
            b["best_s"], b["median_s"] = min(b["times_s"]), statistics.median(b["times_s"])
            print(f"{case.name:>10} {impl:>10} {b['best_s']:8.2f} {b['median_s']:9.2f} "
                  f"{b['peak_rss_mib']:13.0f} {b['forward_mib']:12.0f}")
        if "ours" in best and "diffusers" in best:
            o, d = best["ours"], best["diffusers"]
            print(f"{'':>10} ours/diffusers: time {o['best_s'] / d['best_s']:.2f}x best, "
                  f"{o['median_s'] / d['median_s']:.2f}x median; peak RSS "
                  f"{o['peak_rss_mib'] / d['peak_rss_mib']:.2f}x, forward memory "
                  f"{o['forward_mib'] / d['forward_mib']:.2f}x")
        if args.paired:
            spec = json.dumps({"case": asdict(case), "impl": "paired", "threads": threads, "pairs": args.paired})
            run = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
            if run.returncode:
                raise RuntimeError(f"{case.name} paired failed:\n{run.stderr}")
            r = json.loads(run.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{'':>10} paired in one process, {args.paired} pairs: ours/reference time "
                  f"{statistics.median(r['ratios']):.2f}x median (min {min(r['ratios']):.2f}x, "
                  f"max {max(r['ratios']):.2f}x); ours {statistics.median(r['ours_s']):.2f} s, "
                  f"reference {statistics.median(r['reference_s']):.2f} s median")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
