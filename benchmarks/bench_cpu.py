"""ldm against diffusers on the CPU, and the levers that make it faster, measured in one run.

    python benchmarks/bench_cpu.py                       # 256 and 512 px, fp32 and bf16 (~15 min, 2 free cores)
    python benchmarks/bench_cpu.py --quick               # 256 px, 2 rounds (~4 min)
    python benchmarks/bench_cpu.py --sizes 256 --dtypes bf16 --repeats 3 --threads 1
    python benchmarks/bench_cpu.py --checkpoint /tmp/full.safetensors   # write it once, reuse it next time
    python benchmarks/bench_cpu.py --markdown perf.md    # also write the tables (markdown) to a file
    python benchmarks/bench_cpu.py --sdcpp ~/stable-diffusion.cpp/build/bin/sd-cli   # + stable-diffusion.cpp
    python benchmarks/bench_cpu.py --device cuda --dtypes fp16 --sizes 512 --levers none   # a GPU

The model. Full-size SD 1.x with random weights, written once as a single-file checkpoint
(ldm.weights.random_checkpoint, 4.3 GB, in a temporary folder unless --checkpoint names a file; a
real SD 1.x checkpoint works too). Each side loads it the way its users do: ldm.load(path, dtype=...)
and diffusers' StableDiffusionPipeline.from_single_file (offline, through tests/ref_sd.py) with the
Euler scheduler. Both keep fp32 weights as views of the memory-mapped file, and they do the same
work: their fp32 UNet outputs agree to the last bits (the "same work" table).

The variants. Each is a worker process that loads the model once per dtype and is then driven over a
pipe, so its memory is its own. Two are alive at a time (4.3 GB each in fp32): a fresh "ldm" and one
partner per group:
  diffusers          the reference, glibc malloc's defaults (as its users run it)
  ldm-untuned        ldm with LDM_TUNE_ALLOCATOR=0: no ldm.memory.tune_allocator (the allocator lever)
  ldm channels_last  ldm with the UNet's weights and input in torch.channels_last
  ldm compile        (--compile) ldm.load(..., compile=True): the UNet through torch.compile with
                     inductor's freezing (ldm.compiled); the first call at each shape compiles (minutes)
                     and is the untimed warm-up, whose seconds the lever table gives ("first call").
                     Its group also runs diffusers, so the table has compiled ldm / diffusers directly
and "ldm vae32", inside the ldm worker for bf16: the VAE in fp32 (from the fp32 weights), what
ldm.load(dtype="auto") ran before the VAE went to bf16 too. "ldm" is as ldm.load leaves it: allocator
tuned, contiguous, eager.

The ops.
  unet   one UNet forward of classifier-free guidance: batch 2, the latent of a size x size image
         (size / 8), 77 context tokens, t = 500;
  e2e    one image: text encoder (prompt and "" negative), --steps Euler steps at guidance 7.5, VAE
         decode, PIL image (loading excluded).
Every variant runs each op once untimed first (a warm-up; e2e only up to --e2e-warmup-max px, since
at 512 px it costs a VAE decode: there the first round carries each variant's first call alike), then
--repeats rounds in alternating order (A B, B A, ...), so that a change of the machine's load hits the
variants alike. Reported: the median seconds, the median of the per-round ratios (wall clock, and CPU
time = user + system of the worker process), minor page faults and system seconds per call.

Memory: each worker resets its peak-RSS mark (writes 5 to /proc/self/clear_refs, Linux) before an op
and reads VmHWM after it: "peak" is the largest resident set of that process during the op, weights
included (file-backed pages of the checkpoint that were touched count too); "after" is VmRSS when the
op returned (memory a tuned allocator keeps). No tracemalloc (it slows every allocation). On CUDA also
torch.cuda.max_memory_allocated.

The load average (1 minute, os.getloadavg) is printed beside every measurement and as a range per
row. The run itself keeps about --threads busy; a load above the number of cores (marked "!" past
cores + 0.5) means runnable jobs waited for a core. On a machine shared with other jobs, torch's
default of one thread per core is fragile: with 2 threads on 2 cores and another job on one of them,
every parallel region waits for its descheduled thread, and a UNet step was seen 6-10x slower (bf16,
256 px: 6.9-9.1 s against 0.83 s on the idle machine and 1.3-1.5 s with one thread). --threads 1
leaves a core to the others; the ratios, taken within a round, suffer less than the seconds.

bf16 means every network in bf16 on both sides (dtype=torch.bfloat16 in ldm.load, torch_dtype in
diffusers), fp16 likewise (the VAE too: same work on both sides, where ldm.load's default would keep
its VAE in fp32). The dtype table compares ldm's bf16 with its fp32 (measured in different phases, so
less robust to drifting load than the interleaved ratios): speed, the UNet output's relative L2 and
max |diff|, and the uint8 image difference (on random weights the images are noise; a real
checkpoint's images show how visible the difference is).

--sdcpp PATH also times stable-diffusion.cpp's command-line binary (sd or sd-cli; not a dependency,
skipped cleanly when absent; built from source with `git clone --recursive
https://github.com/leejet/stable-diffusion.cpp; cmake -S stable-diffusion.cpp -B build
-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON; cmake --build build --target sd-cli`) on the same checkpoint: --repeats runs per e2e size and dtype with the same
size, steps, guidance 7.5, Euler and --threads; seconds per step from its own log ("sampling completed,
taking X s" / steps, else its "s/it"), next to ldm's UNet step. fp32 runs it with --type f32, bf16 with
--type bf16 (a build without bf16 fails: the row says so).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a dog wearing a hat"
TAG = "@@bench "  # the worker's answer lines on stdout start with this

VARIANTS = {  # worker name -> how it is built
    "ldm": {"side": "ldm"},
    "diffusers": {"side": "diffusers"},
    "ldm-untuned": {"side": "ldm", "env": {"LDM_TUNE_ALLOCATOR": "0"}},
    "ldm channels_last": {"side": "ldm", "memory_format": "channels_last"},
    "ldm compile": {"side": "ldm", "compile": True},
}
LEVER_TITLES = {"ldm-untuned": "glibc malloc defaults (no tune_allocator)", "ldm channels_last": "channels_last",
                "ldm compile": "torch.compile, freezing", "ldm vae32": "VAE in fp32 (vae_dtype=float32)"}


# ---------------------------------------------------------------------------------------------------
# The worker: one variant's pipeline, driven over stdin / stdout
# ---------------------------------------------------------------------------------------------------

def status_mib(field: str) -> float:
    """A line of /proc/self/status (VmRSS, VmHWM) in MiB; NaN where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        pass


class Worker:
    """One variant's pipeline (VARIANTS[name]) in one dtype on one device."""

    def __init__(self, name: str, dtype: str, device: str, threads: int, checkpoint: str):
        import torch

        torch.set_num_threads(threads)
        spec = VARIANTS[name]
        self.torch, self.name, self.side, self.device = torch, name, spec["side"], torch.device(device)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.memory_format = torch.channels_last if spec.get("memory_format") == "channels_last" \
            else torch.contiguous_format
        t0 = time.perf_counter()
        sys.path.insert(0, str(ROOT / "tests"))
        self.vae32 = None
        if self.side == "ldm":
            import ldm
            from ldm import checkpoint as ck_mod, memory, weights

            self.pipe = ldm.load(checkpoint, device=self.device, dtype=self.dtype, vae_dtype=self.dtype,
                                 compile=bool(spec.get("compile")))  # compile: ldm.compiled, as users get it
            self.tuned = bool(memory.tune_allocator())  # what load did (cached): False with LDM_TUNE_ALLOCATOR=0
            self.vae_low = self.pipe.vae
            if name == "ldm" and self.dtype != torch.float32 and self.device.type == "cpu":
                # "ldm vae32": the VAE in fp32, from the file's weights (memory-mapped)
                self.vae32 = weights.build_stages(ck_mod.read(checkpoint))["vae"]
        else:
            import ref_sd
            from ldm import checkpoint as ck_mod, weights

            configs = weights.configs_for(ck_mod.read(checkpoint))
            folder = Path(tempfile.mkdtemp(prefix="bench-cpu-config-"))
            base = ref_sd.load_with_diffusers(Path(checkpoint), configs, folder / "config", torch_dtype=self.dtype)
            shutil.rmtree(folder, ignore_errors=True)
            self.pipe = ref_sd.as_pipeline(base, "txt2img", "euler").to(self.device)
            self.tuned = False
        self.unet = self.pipe.unet
        if self.memory_format is torch.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.forward = self.unet
        self.grad_mode = torch.no_grad if spec.get("compile") else torch.inference_mode
        self.load_s = time.perf_counter() - t0

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def unet_fn(self, size: int):
        """One CFG UNet forward (batch 2) on a size x size image's latent, as a closure."""
        torch = self.torch
        g = torch.Generator().manual_seed(0)
        h = size // 8
        x = torch.randn(2, 4, h, h, generator=g).to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        ctx = torch.randn(2, 77, 768, generator=g).to(self.device, self.dtype)
        t = torch.full((2,), 500, device=self.device)
        if self.side == "diffusers":
            return lambda: self.forward(x, t, encoder_hidden_states=ctx).sample
        return lambda: self.forward(x, t, ctx)

    def e2e_fn(self, size: int, steps: int, auto: bool):
        torch = self.torch
        if self.side == "ldm":
            self.pipe.stages["vae"] = self.vae32 if auto else self.vae_low
            return lambda: self.pipe.generate(PROMPT, steps=steps, scheduler="euler", guidance=7.5, seed=0,
                                              height=size, width=size, progress=False).images[0]

        def run():
            gens = [torch.Generator("cpu").manual_seed(0)]
            return self.pipe(PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=7.5,
                             generator=gens, height=size, width=size).images[0]
        return run

    def run(self, cmd: dict) -> dict:
        import resource

        torch = self.torch
        if cmd["op"] == "unet":
            fn = self.unet_fn(cmd["size"])
        else:
            if cmd.get("auto") and self.vae32 is None:
                raise ValueError(f"{self.name}: no fp32 VAE for 'auto' here")
            fn = self.e2e_fn(cmd["size"], cmd["steps"], cmd.get("auto", False))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        reset_peak()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        with self.grad_mode():
            out = fn()
            self.sync()
        seconds = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        res = {"s": seconds, "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
               "sys_s": r1.ru_stime - r0.ru_stime, "minflt": r1.ru_minflt - r0.ru_minflt,
               "peak_mib": status_mib("VmHWM"), "after_mib": status_mib("VmRSS"), "load": os.getloadavg()[0]}
        if self.device.type == "cuda":
            res["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if cmd.get("save"):
            if cmd["op"] == "unet":
                torch.save(out.detach().float().cpu().contiguous(), cmd["save"])
            else:
                import numpy as np
                np.save(cmd["save"], np.asarray(out))
        return res


def worker_main(spec: dict) -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # anything the libraries print goes to the worker's log, not into the protocol
    try:
        w = Worker(spec["name"], spec["dtype"], spec["device"], spec["threads"], spec["checkpoint"])
    except Exception as e:
        out.write(TAG + json.dumps({"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}) + "\n")
        out.flush()
        raise
    out.write(TAG + json.dumps({"load_s": w.load_s, "rss_mib": status_mib("VmRSS"), "tuned": w.tuned}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            res = w.run(cmd)
        except Exception as e:  # reported in the table; the worker carries on
            res = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        out.write(TAG + json.dumps(res) + "\n")
        out.flush()


# ---------------------------------------------------------------------------------------------------
# The parent: workers, rounds, tables
# ---------------------------------------------------------------------------------------------------

class Proc:
    """A running worker process; its stderr goes to a log file, printed if it dies."""

    def __init__(self, name: str, dtype: str, args, logdir: Path):
        self.name, self.log = name, logdir / f"{name.replace(' ', '_')}-{dtype}.log"
        spec = json.dumps({"name": name, "dtype": dtype, "device": args.device, "threads": args.threads,
                           "checkpoint": str(args.checkpoint)})
        self.p = subprocess.Popen([sys.executable, __file__, "--worker", spec], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True,
                                  env={**os.environ, **VARIANTS[name].get("env", {})}, cwd=ROOT)

    def read(self) -> dict:
        for line in self.p.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        tail = self.log.read_text()[-3000:] if self.log.exists() else ""
        raise RuntimeError(f"worker {self.name} exited (code {self.p.wait()}):\n{tail}")

    def ask(self, cmd: dict) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self.read()

    def close(self) -> None:
        try:
            self.p.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.p.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def load1() -> float:
    return os.getloadavg()[0]


def fmt_s(x) -> str:
    return "n/a" if x is None else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def fmt_r(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def gib(mib) -> str:
    return "n/a" if mib is None or mib != mib else f"{mib / 1024:.2f}"


class Row:
    """One op at one size and dtype in one group: per variant, the answers of every round."""

    def __init__(self, group: str, op: str, size: int, dtype: str, variants: list[str]):
        self.group, self.op, self.size, self.dtype, self.variants = group, op, size, dtype, variants
        self.runs: dict[str, list[dict]] = {v: [] for v in variants}
        self.errors: dict[str, str] = {}
        self.first: dict[str, float] = {}  # the untimed warm-up call's seconds (compiling, for "ldm compile")
        self.loads: list[float] = []

    @property
    def title(self) -> str:
        return "UNet step" if self.op == "unet" else "e2e"

    def med(self, v: str, key: str = "s"):
        xs = [r[key] for r in self.runs.get(v, []) if key in r]
        return statistics.median(xs) if xs else None

    def peak(self, v: str, key: str = "peak_mib"):
        xs = [r[key] for r in self.runs.get(v, []) if key in r]
        return max(xs) if xs else None

    def ratio(self, a: str, b: str, key: str = "s"):
        """Median over the rounds of a's / b's value in the same round."""
        rs = [x[key] / y[key] for x, y in zip(self.runs.get(a, []), self.runs.get(b, [])) if y.get(key)]
        return statistics.median(rs) if rs else None

    def load_range(self, cores: int) -> str:
        """The 1-minute load average seen during the row, "!" where it passed cores + 0.5 (jobs waited)."""
        if not self.loads:
            return "n/a"
        lo, hi = min(self.loads), max(self.loads)
        return f"{lo:.1f}-{hi:.1f}" + (" !" if hi > cores + 0.5 else "")


def command(variant: str, op: str, size: int, steps: int) -> tuple[str, dict]:
    """(worker name, command) of a variant of a row: "ldm vae32" is the ldm worker with its fp32 VAE."""
    cmd = {"op": op, "size": size, "steps": steps}
    if variant == "ldm vae32":
        return "ldm", {**cmd, "auto": True}
    return variant, cmd


def measure(row: Row, procs: dict, repeats: int, steps: int, warmup: bool, outdir: Path) -> Row:
    """A warm-up call of every variant (if warmup), then `repeats` rounds in alternating order (AB BA ...)."""
    order, saved = list(row.variants), set()

    def call(v: str, timed: bool):
        name, cmd = command(v, row.op, row.size, steps)
        if v not in saved:  # the first call's output, for the comparisons
            cmd["save"] = str(outdir / f"{v.replace(' ', '_')}-{row.op}-{row.size}-{row.dtype}")
            saved.add(v)
        t0 = time.perf_counter()
        res = procs[name].ask(cmd)
        if "error" in res:
            row.errors[v] = res["error"]
            print(f"  {row.op} {row.size}px {row.dtype} {v:18s} failed: {res['error']}", flush=True)
        elif not timed:
            row.first[v] = time.perf_counter() - t0
            print(f"  {row.op} {row.size}px {row.dtype} {v:18s} warm-up {time.perf_counter() - t0:7.2f} s "
                  f"(load {load1():.2f})", flush=True)
        else:
            row.runs[v].append(res)
            row.loads.append(res["load"])
            print(f"  {row.op} {row.size}px {row.dtype} {v:18s} {res['s']:8.2f} s  cpu {res['cpu_s']:7.2f} s  "
                  f"sys {res['sys_s']:5.2f} s  {res['minflt']:8d} faults  peak {gib(res['peak_mib'])} GiB  "
                  f"after {gib(res['after_mib'])} GiB  (load {res['load']:.2f})", flush=True)

    if warmup:
        for v in order:
            call(v, timed=False)
    for i in range(repeats):
        for v in (order if i % 2 == 0 else order[::-1]):
            if v not in row.errors:
                call(v, timed=True)
    return row


# ---- stable-diffusion.cpp --------------------------------------------------------------------------

def sdcpp_run(binary: str, model: Path, size: int, steps: int, dtype: str, threads: int, out: Path) -> dict:
    """One stable-diffusion.cpp generation; its seconds per step from its own log."""
    typ = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[dtype]
    cmd = [binary, "-m", str(model), "-p", PROMPT, "-W", str(size), "-H", str(size), "--steps", str(steps),
           "--cfg-scale", "7.5", "--sampling-method", "euler", "-s", "0", "-t", str(threads), "--type", typ,
           "-o", str(out)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    res = {"wall_s": time.perf_counter() - t0, "load": load1()}
    log = p.stdout + p.stderr
    if p.returncode:
        last = [ln for ln in log.splitlines() if ln.strip()][-1:] or ["(no output)"]
        return {**res, "error": f"exit {p.returncode}: {last[0][:200]}"}
    if m := re.search(r"sampling completed, taking ([\d.]+)\s*s", log):
        res["s"] = float(m.group(1)) / steps
    elif m := re.findall(r"([\d.]+)\s*s/it", log):
        res["s"] = float(m[-1])
    elif m := re.findall(r"([\d.]+)\s*it/s", log):
        res["s"] = 1 / float(m[-1])
    if m := re.search(r"decoded, taking ([\d.]+)\s*s", log):
        res["decode_s"] = float(m.group(1))
    if "s" not in res:
        res["error"] = "no timing found in its log"
    return res


# ---- the run ----------------------------------------------------------------------------------------

def machine(device: str) -> dict:
    import diffusers
    import torch

    from ldm.memory import _cpu_flags, cpu_has_native_bf16

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    flags = sorted(f for f in _cpu_flags() if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"))
    info = {"date": datetime.date.today().isoformat(), "cpu": model, "cores": os.cpu_count(),
            "flags": " ".join(flags) or "unknown", "native_bf16": cpu_has_native_bf16(),
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def compare_outputs(outdir: Path, dtypes: list[str], sizes: list[int]) -> list[dict]:
    """How far apart two runs' outputs are: the same work (ldm vs diffusers), or what bf16 changes."""
    import numpy as np
    import torch

    def unet(v, size, dt):
        p = outdir / f"{v}-unet-{size}-{dt}"
        return torch.load(p, weights_only=True) if p.exists() else None

    def image(v, size, dt):
        p = outdir / f"{v}-e2e-{size}-{dt}.npy"
        return np.load(p).astype(np.int16) if p.exists() else None

    def unet_diff(a, b):
        if a is None or b is None:
            return None
        return {"max_abs": float((a - b).abs().max()), "rel_l2": float((a - b).norm() / b.norm())}

    def image_diff(a, b):
        if a is None or b is None:
            return None
        d = np.abs(a - b)
        return {"max_px": int(d.max()), "mean_px": float(d.mean())}

    rows = []
    for size in sizes:
        for dt in dtypes:
            rows.append({"size": size, "what": f"ldm vs diffusers, {dt}",
                         "unet": unet_diff(unet("ldm", size, dt), unet("diffusers", size, dt)),
                         "image": image_diff(image("ldm", size, dt), image("diffusers", size, dt))})
            for lever in ("channels_last", "compile"):
                rows.append({"size": size, "what": f"ldm {lever} vs ldm, {dt}",
                             "unet": unet_diff(unet(f"ldm_{lever}", size, dt), unet("ldm", size, dt)), "image": None})
            if dt != "fp32":
                rows.append({"size": size, "what": f"ldm channels_last {dt} vs ldm fp32",
                             "unet": unet_diff(unet("ldm_channels_last", size, dt), unet("ldm", size, "fp32")),
                             "image": None})
                rows.append({"size": size, "what": f"ldm {dt} vs ldm fp32",
                             "unet": unet_diff(unet("ldm", size, dt), unet("ldm", size, "fp32")),
                             "image": image_diff(image("ldm", size, dt), image("ldm", size, "fp32"))})
                rows.append({"size": size, "what": f"ldm {dt}, VAE fp32 vs ldm fp32", "unet": None,
                             "image": image_diff(image("ldm_vae32", size, dt), image("ldm", size, "fp32"))})
    return [r for r in rows if r["unet"] or r["image"]]


def tables(info: dict, rows: list[Row], diffs: list[dict], sdcpp: dict, args) -> str:
    """Every result as markdown."""
    th, cores = args.threads, info["cores"] or 1
    L = [f"{info['date']}; {info['cpu']}, {info['cores']} cores ({info['flags']}; native bf16: "
         f"{info['native_bf16']}); torch {info['torch']} ({info['capability']}), diffusers {info['diffusers']}; "
         f"{th} thread{'s' if th > 1 else ''}" + (f"; {info['gpu']}" if "gpu" in info else "") + ". "
         f"Full-size SD 1.x, random weights. UNet step: one CFG forward (batch 2); e2e: one image, {args.steps} "
         f"Euler steps at guidance 7.5, text encoder and VAE decode included. Seconds: medians of interleaved "
         f"rounds; ratios: medians of the per-round ratios, by wall clock and by CPU time (below 1: the first "
         f"is faster or smaller). Load: the 1-minute load average during the row; this run keeps {th} busy, and "
         f"\"!\" marks a load above {cores + 0.5:g}: more runnable jobs than cores, so some waited.", ""]
    main = [r for r in rows if r.group == "diffusers"]
    peak_key = "cuda_peak_mib" if args.device == "cuda" else "peak_mib"
    if main:
        L += ["| op | px | dtype | ldm s | diffusers s | ldm / diffusers | (CPU time) | ldm peak GiB | "
              "diffusers peak GiB | load |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in main:
            L.append(f"| {r.title} | {r.size} | {r.dtype} | {fmt_s(r.med('ldm'))} | {fmt_s(r.med('diffusers'))} | "
                     f"{fmt_r(r.ratio('ldm', 'diffusers'))} | {fmt_r(r.ratio('ldm', 'diffusers', 'cpu_s'))} | "
                     f"{gib(r.peak('ldm', peak_key))} | {gib(r.peak('diffusers', peak_key))} | {r.load_range(cores)} |"
                     + "".join(f" {v} failed: {e[:100]}" for v, e in r.errors.items()))
    levers = [(r, v) for r in rows for v in r.variants if v in LEVER_TITLES]
    if levers:
        L += ["", "Levers, each against ldm as ldm.load leaves it (allocator tuned, contiguous, eager, networks in "
              "the row's dtype) in the same rounds; faults: minor page faults per call; after: RSS when it returned.",
              "Where diffusers ran in the same rounds (the compile group), lever / diffusers too; first call: the "
              "untimed warm-up's seconds (compiling).",
              "", "| op | px | dtype | lever | s | ldm s | lever / ldm | (CPU time) | lever / diffusers | first call s | "
              "faults, lever / ldm | sys s, lever / ldm | peak GiB, lever / ldm | after GiB, lever / ldm | load |",
              "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r, v in levers:
            if not r.runs.get(v):
                L.append(f"| {r.title} | {r.size} | {r.dtype} | {LEVER_TITLES[v]} | failed: "
                         f"{r.errors.get(v, '?')[:100]} | | | | | | | | | | |")
                continue

            def pair(key, f, r=r, v=v):
                vals = [r.peak(x, key) if key.endswith("mib") else r.med(x, key) for x in (v, "ldm")]
                return " / ".join("n/a" if x is None else f(x) for x in vals)
            L.append(f"| {r.title} | {r.size} | {r.dtype} | {LEVER_TITLES[v]} | {fmt_s(r.med(v))} | "
                     f"{fmt_s(r.med('ldm'))} | {fmt_r(r.ratio(v, 'ldm'))} | {fmt_r(r.ratio(v, 'ldm', 'cpu_s'))} | "
                     f"{fmt_r(r.ratio(v, 'diffusers')) if 'diffusers' in r.variants else ''} | "
                     f"{fmt_s(r.first.get(v)) if v == 'ldm compile' else ''} | {pair('minflt', lambda x: f'{x:.0f}')} | {pair('sys_s', lambda x: f'{x:.2f}')} | "
                     f"{pair('peak_mib', gib)} | {pair('after_mib', gib)} | {r.load_range(cores)} |")
    by = {(r.op, r.size, r.dtype): r for r in main}
    speed = [(r, by[(r.op, r.size, "fp32")]) for r in main if r.dtype != "fp32" and (r.op, r.size, "fp32") in by]
    if diffs or speed:
        L += ["", "Same work, and what a lower precision changes: UNet outputs (max |diff|, relative L2), images "
              "(uint8, 0-255), and ldm's speed-up over its own fp32 (measured in different phases: \"!\" where "
              "either saw more runnable jobs than cores).", "",
              "| px | compared | UNet max abs | UNet rel L2 | image max | image mean | speed-up |",
              "|---:|---|---:|---:|---:|---:|---:|"]
        for d in diffs:
            u, im = d["unet"], d["image"]
            cells = ([f"{u['max_abs']:.2e}", f"{u['rel_l2']:.2e}"] if u else ["", ""]) + \
                ([str(im["max_px"]), f"{im['mean_px']:.2f}"] if im else ["", ""])
            L.append(f"| {d['size']} | {d['what']} | " + " | ".join(cells) + " | |")
        for low, full in speed:  # across phases: the fastest round of each (the least disturbed by other jobs)
            a, b = (min((x["s"] for x in r.runs.get("ldm", [])), default=None) for r in (full, low))
            if a and b:
                busy = " !" if "!" in full.load_range(cores) + low.load_range(cores) else ""
                L.append(f"| {low.size} | ldm {low.dtype} vs fp32, {low.title}, fastest rounds ({fmt_s(b)} s vs "
                         f"{fmt_s(a)} s){busy} | | | | | {a / b:.2f}x |")
    if sdcpp:
        L += ["", "stable-diffusion.cpp: its log's sampling seconds / steps (CFG: two batch-1 forwards per step), "
              "next to ldm's UNet step (one batch-2 forward) from the table above.", "",
              "| px | dtype | sd.cpp s/step | ldm UNet step s | ldm / sd.cpp | sd.cpp decode s | load |",
              "|---:|---|---:|---:|---:|---:|---|"]
        for (size, dt), runs in sdcpp.items():
            ok = [x for x in runs if "s" in x]
            u = by.get(("unet", size, dt))
            ldm_s = u.med("ldm") if u else None
            if not ok:
                L.append(f"| {size} | {dt} | failed: {runs[-1].get('error', '?')[:100]} | {fmt_s(ldm_s)} | | | |")
                continue
            s = statistics.median(x["s"] for x in ok)
            dec = [x["decode_s"] for x in ok if "decode_s" in x]
            loads = [x["load"] for x in ok]
            L.append(f"| {size} | {dt} | {s:.2f} | {fmt_s(ldm_s)} | {fmt_r(ldm_s / s if ldm_s else None)} | "
                     f"{fmt_s(statistics.median(dec) if dec else None)} | {min(loads):.1f}-{max(loads):.1f} |")
    return "\n".join(L) + "\n"


def render(saved: dict) -> str:
    """The tables of a run saved with --json."""
    rows = []
    for r in saved["rows"]:
        row = Row(r["group"], r["op"], r["size"], r["dtype"], list(r["runs"]))
        row.runs, row.errors, row.first = r["runs"], r["errors"], r.get("first", {})
        row.loads = [x["load"] for runs in r["runs"].values() for x in runs]
        rows.append(row)
    a = saved["args"]
    args = argparse.Namespace(threads=int(a["threads"]), steps=int(a["steps"]), device=a["device"])
    sdcpp = {(int(k.split("-")[0]), k.split("-")[1]): v for k, v in saved.get("sdcpp", {}).items()}
    return tables(saved["machine"], rows, saved["diffs"], sdcpp, args)


def make_plan(args, sizes, dtypes, ops, levers) -> list[tuple[str, str, list[tuple[str, int, list[str]]]]]:
    """[(dtype, partner worker, [(op, size, variants), ...]), ...]: the groups, in order."""
    plan = []
    for dt in dtypes:
        rows = []
        for size in sizes:
            for op in ops:
                vae32 = op == "e2e" and dt != "fp32" and "auto" in levers and args.device == "cpu"
                rows.append((op, size, ["ldm", "diffusers"] + (["ldm vae32"] if vae32 else [])))
        plan.append((dt, "diffusers", rows))
        if "untuned" in levers:
            plan.append((dt, "ldm-untuned", [(op, s, ["ldm", "ldm-untuned"]) for s in sizes for op in ops
                                             if op == "unet" or s <= args.untuned_e2e_max]))
        if "channels_last" in levers:  # fp32 at the smallest size only (slower there, as measured before)
            cl = sizes if dt != "fp32" else sizes[:1]
            plan.append((dt, "ldm channels_last", [("unet", s, ["ldm", "ldm channels_last"]) for s in cl]))
        if "compile" in levers:  # compiling costs minutes per shape: the smallest size, diffusers alongside
            plan.append((dt, "ldm compile", [(op, sizes[0], ["ldm", "ldm compile", "diffusers"]) for op in ops]))
    return plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="256 px, 2 rounds, 2-step e2e, the allocator lever on the UNet step only (~4 min, 2 free cores)")
    ap.add_argument("--sizes", help="comma list of image sides, multiples of 64 (default 256,512)")
    ap.add_argument("--dtypes", help="comma list of fp32, bf16, fp16 (default fp32,bf16; on cuda fp16)")
    ap.add_argument("--ops", default="unet,e2e", help="comma list of unet, e2e (default both)")
    ap.add_argument("--repeats", type=int, help="rounds per row (default 3 up to 256 px, 2 above; --quick 2)")
    ap.add_argument("--steps", type=int, help="Euler steps of the e2e op (default 3; --quick 2)")
    ap.add_argument("--levers", default="untuned,channels_last,auto",
                    help="comma list of untuned, channels_last, auto, compile, or none (default all but compile)")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile lever (minutes of compiling)")
    ap.add_argument("--untuned-e2e-max", type=int, metavar="PX",
                    help="largest size at which the allocator lever also runs e2e (default 256; --quick 0: none)")
    ap.add_argument("--e2e-warmup-max", type=int, default=256, metavar="PX",
                    help="largest size whose e2e gets an untimed warm-up call (default 256)")
    ap.add_argument("--threads", type=int, help="torch threads in every worker (default: torch's, the cores)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--checkpoint", type=Path,
                    help="SD 1.x checkpoint to load; if the file does not exist, a full-size random one is written "
                         "there and kept (default: one in a temporary folder, deleted at the end)")
    ap.add_argument("--sdcpp", metavar="PATH", help="stable-diffusion.cpp's binary (sd or sd-cli): time it too")
    ap.add_argument("--sdcpp-sizes", help="comma list of the sizes stable-diffusion.cpp runs at (default: --sizes)")
    ap.add_argument("--markdown", type=Path, help="write the tables (markdown) to this file")
    ap.add_argument("--json", type=Path, help="write every measurement to this file")
    ap.add_argument("--dry-run", action="store_true", help="print the machine and the plan; run nothing")
    ap.add_argument("--render", type=Path, metavar="JSON", help="print the tables of an earlier run's --json file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0

    sys.path.insert(0, str(ROOT))
    if args.render:
        print(render(json.loads(args.render.read_text())), end="")
        return 0
    import torch

    args.threads = args.threads or torch.get_num_threads()
    args.steps = args.steps or (2 if args.quick else 3)
    if args.untuned_e2e_max is None:
        args.untuned_e2e_max = 0 if args.quick else 256
    sizes = sorted(int(s) for s in (args.sizes or ("256" if args.quick else "256,512")).split(","))
    dtypes = (args.dtypes or ("fp16" if args.device == "cuda" else "fp32,bf16")).split(",")
    ops = args.ops.split(",")
    levers = set() if args.levers == "none" else set(args.levers.split(","))
    if args.compile:
        levers.add("compile")
    bad = [d for d in dtypes if d not in ("fp32", "bf16", "fp16")] + [o for o in ops if o not in ("unet", "e2e")] \
        + [lv for lv in levers if lv not in ("untuned", "channels_last", "auto", "compile")] \
        + [s for s in sizes if s % 64 or s <= 0]
    if bad:
        ap.error(f"not allowed: {bad}")
    if args.device == "cuda":
        levers -= {"untuned", "auto", "compile"}  # the allocator and "auto" levers are the CPU's

    def repeats_for(size: int) -> int:
        return args.repeats or (2 if args.quick or size > 256 else 3)

    info = machine(args.device)
    print(f"{info['date']}  {info['cpu']}, {info['cores']} cores, flags: {info['flags']}; native bf16 "
          f"{info['native_bf16']}; torch {info['torch']} ({info['capability']}), diffusers {info['diffusers']}; "
          f"{args.threads} threads; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    sdcpp_bin = None
    if args.sdcpp:
        sdcpp_bin = shutil.which(args.sdcpp) or (args.sdcpp if Path(args.sdcpp).is_file() else None)
        if sdcpp_bin is None:
            print(f"--sdcpp {args.sdcpp}: no such program; stable-diffusion.cpp is skipped")
    sdcpp_sizes = sorted(int(x) for x in args.sdcpp_sizes.split(",")) if args.sdcpp_sizes else sizes
    plan = make_plan(args, sizes, dtypes, ops, levers)
    for dt, partner, rows in plan:
        for op, size, variants in rows:
            print(f"plan: {dt} [ldm + {partner}] {op} {size}px x{repeats_for(size)}: {', '.join(variants)}")
    if sdcpp_bin:
        print(f"plan: stable-diffusion.cpp {sdcpp_bin}, {', '.join(map(str, sdcpp_sizes))} px, after each dtype's "
              f"diffusers group")
    if args.dry_run:
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_cpu: --device cuda, but torch sees no CUDA GPU", file=sys.stderr)
        return 1

    tmp = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    t_start = time.perf_counter()
    if args.checkpoint is None or not args.checkpoint.exists():
        from ldm import weights

        target = args.checkpoint or tmp / "random-full-sd1.safetensors"
        print(f"writing a full-size SD 1.x random checkpoint to {target} ...", flush=True)
        args.checkpoint = weights.random_checkpoint(target, size="full")
    rows, sdcpp = [], {}
    try:
        for dt, partner, group in plan:
            procs = {}
            try:  # a fresh ldm worker per group: its memory carries nothing from another group's rows
                names = [command(v, op, size, 0)[0] for op, size, vs in group for v in vs]
                for name in dict.fromkeys(["ldm", partner] + names):  # every worker the group's rows use, once
                    procs[name] = Proc(name, dt, args, tmp)
                    ready = procs[name].read()
                    if "error" in ready:
                        raise RuntimeError(f"worker {name} {dt} failed to start: {ready['error']}")
                    print(f"worker {name} {dt}: loaded in {ready['load_s']:.1f} s, RSS {gib(ready['rss_mib'])} GiB, "
                          f"allocator tuned: {ready['tuned']} (load {load1():.2f})", flush=True)
                for op, size, variants in group:
                    warm = op == "unet" or size <= args.e2e_warmup_max
                    rows.append(measure(Row(partner, op, size, dt, variants), procs, repeats_for(size), args.steps,
                                        warm, tmp))
            except RuntimeError as e:
                if "failed to start" not in str(e):
                    raise
                print(e, flush=True)
                for op, size, variants in group:
                    row = Row(partner, op, size, dt, variants)
                    row.errors[partner] = str(e)
                    rows.append(row)
            finally:
                for p in procs.values():
                    p.close()
            if partner == "diffusers" and sdcpp_bin and "e2e" in ops:
                for size in sdcpp_sizes:
                    for _ in range(repeats_for(size)):
                        r = sdcpp_run(sdcpp_bin, args.checkpoint, size, args.steps, dt, args.threads, tmp / "sdcpp.png")
                        sdcpp.setdefault((size, dt), []).append(r)
                        print(f"  sd.cpp {size}px {dt}: " + (f"{r['s']:.2f} s/step (load {r['load']:.2f})"
                                                              if "s" in r else r["error"]), flush=True)
        diffs = compare_outputs(tmp, dtypes, sizes)
        md = tables(info, rows, diffs, sdcpp, args)
        print(f"\n{md}\n(total {time.perf_counter() - t_start:.0f} s)")
        if args.markdown:
            args.markdown.write_text(md)
        if args.json:
            args.json.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                             "rows": [{"group": r.group, "op": r.op, "size": r.size, "dtype": r.dtype,
                                                       "runs": r.runs, "errors": r.errors, "first": r.first}
                                                      for r in rows],
                                             "diffs": diffs,
                                             "sdcpp": {f"{k[0]}-{k[1]}": v for k, v in sdcpp.items()}}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
