#!/usr/bin/env bash
# The GPU checks in one go, for the first machine with a CUDA GPU (about 8 minutes on one H100):
#
#   1. the GPU tests: every test marked gpu (full tier included), in the files that have them;
#   2. kernels/bench_flash_attention.py: our Triton kernel against every SDPA backend on the SD 1.x
#      shapes, fp16 and bf16 (the "pad" head-dim strategy with the UNet step per backend, then "split");
#   3. the pipeline against diffusers on the GPU: benchmarks/bench_cpu.py --device cuda, 512x512, fp16
#      and bf16 (the VAE too, on both sides), UNet step and a 20-step image, 5 interleaved rounds, the
#      same random full-size SD 1.x weights (a 4.3 GB checkpoint written to /tmp first);
#
# and writes what it saw as markdown to OUTDIR/gpu_check.md (a table of the parts, then each part's
# own tables), with every part's log beside it. Each part has a time limit (seconds: TESTS_S, FLASH_S,
# SPLIT_S, PIPELINE_S below, overridable from the environment), so the script always ends and always
# writes its table; a part past its limit says "timed out".
#
#   benchmarks/gpu_check.sh                  # OUTDIR = $OUT if set, else /tmp/ldm-gpu-check
#   benchmarks/gpu_check.sh /tmp/gpu         # OUTDIR given
#   benchmarks/gpu_check.sh --dry-run [DIR]  # no GPU needed: the plan, imports, test collection, the
#                                            # benchmarks' --dry-run; the table says "dry run"
#   benchmarks/gpu_check.sh --fetch-wheels   # here, with network: the wheels the GPU image lacks
#                                            # (diffusers, importlib_metadata) into .whl/
#
# Environment on the GPU machine: its python3 with torch (CUDA), triton, transformers, safetensors,
# einops and pytest. diffusers is not in this workplace's GPU image and the machine has no network:
# run --fetch-wheels here first, keep .whl/ out of git (.git/info/exclude), carry it, and this script
# installs .whl/*.whl into /tmp/site by itself. ldm runs from the checkout (PYTHONPATH), no install.
# With this workplace's device tool: run(command="benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600);
# OUTDIR is then $OUT, whose files (at most 8: this script writes 7) come back.
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)

DRY=0
FETCH=0
OUTDIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --fetch-wheels) FETCH=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) OUTDIR=$arg ;;
  esac
done
OUTDIR=${OUTDIR:-${OUT:-/tmp/ldm-gpu-check}}
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ] && [ "$DRY" = 1 ]; then PY=$ROOT/.venv/bin/python; fi

if [ "$FETCH" = 1 ]; then
  # pure-Python wheels; the versions this checkout's environment has (else the newest)
  mkdir -p .whl
  for pkg in diffusers importlib_metadata; do
    ver=$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))" 2>/dev/null)
    "$PY" -m pip download --no-deps --only-binary=:all: -d .whl "$pkg${ver:+==$ver}" || exit 1
  done
  ls -l .whl
  echo "now: echo /.whl/ >> .git/info/exclude, and carry .whl to the GPU machine"
  exit 0
fi

TESTS_S=${TESTS_S:-190}     # the four parts' limits: 7.8 minutes together
FLASH_S=${FLASH_S:-90}
SPLIT_S=${SPLIT_S:-40}
PIPELINE_S=${PIPELINE_S:-150}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/ldm-triton-cache}   # the tests' autotuning, reused by the benchmark
if ls .whl/*.whl >/dev/null 2>&1 && [ "$DRY" = 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT:$ROOT/kernels:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}

SUMMARY=$OUTDIR/gpu_check.md   # with the logs: at most 8 files in OUTDIR (what a device run brings back)
ENVFILE=$(mktemp)
ROWS=()
started=$(date +%s)

# run NAME LIMIT_S LOG CMD...: one part, its status and seconds appended to ROWS
run() {
  local name=$1 limit=$2 log=$3; shift 3
  local t0 rc status
  t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee "$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  ROWS+=("| $name | $status | $(( $(date +%s) - t0 )) | $(result_of "$name" "$log") |")
  tail -n 5 "$log"
}

# one line that says what a part found
result_of() {
  case $1 in
    *tests*) grep -E "(passed|failed|skipped|error|deselected|no tests ran)" "$2" | tail -n 1 | tr '|' '/' ;;
    *) grep -cE "^\| (self|cross|triton|sdpa|UNet|e2e)" "$2" | sed 's/$/ table rows/' ;;
  esac
}

GPU_TEST_FILES=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
echo "gpu_check: out $OUTDIR, python $PY, gpu test files: $GPU_TEST_FILES"
"$PY" - <<'EOF' 2>&1 | tee "$ENVFILE"
import importlib, platform, subprocess
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible")
for name in ("triton", "diffusers", "transformers", "safetensors", "einops", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # a missing package is a line here; the part that needs it fails with it
        print(name, "MISSING:", type(e).__name__, e)
try:
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip())
except Exception as e:
    print("nvidia-smi:", e)
EOF

if [ "$DRY" = 1 ]; then
  run "gpu tests (collection only)" 120 "$OUTDIR/tests.log" \
    "$PY" -m pytest -q -p no:cacheprovider -m gpu --full --collect-only $GPU_TEST_FILES
  run "flash attention benchmark (--help)" 60 "$OUTDIR/flash.log" "$PY" kernels/bench_flash_attention.py --help
  run "pipeline vs diffusers (--dry-run)" 60 "$OUTDIR/pipeline.log" \
    "$PY" benchmarks/bench_cpu.py --device cuda --dtypes fp16,bf16 --sizes 512 --repeats 5 --steps 20 \
    --levers none --dry-run
else
  run "gpu tests" "$TESTS_S" "$OUTDIR/tests.log" \
    "$PY" -m pytest -q -p no:cacheprovider -m gpu --full -rs $GPU_TEST_FILES
  run "flash attention, pad + UNet step" "$FLASH_S" "$OUTDIR/flash.log" \
    "$PY" kernels/bench_flash_attention.py --strategies pad --unet --json "$OUTDIR/flash.json"
  run "flash attention, split" "$SPLIT_S" "$OUTDIR/flash_split.log" \
    "$PY" kernels/bench_flash_attention.py --strategies split
  run "pipeline vs diffusers" "$PIPELINE_S" "$OUTDIR/pipeline.log" \
    "$PY" benchmarks/bench_cpu.py --device cuda --dtypes fp16,bf16 --sizes 512 --repeats 5 --steps 20 \
    --levers none --checkpoint /tmp/ldm-gpu-check-full.safetensors --markdown "$OUTDIR/pipeline.md"
fi

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)$([ "$DRY" = 1 ] && echo ' (dry run: nothing timed)')"
  echo
  sed 's/^/    /' "$ENVFILE"
  echo
  echo "| part | status | seconds | result |"
  echo "|---|---|---:|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "total $(( $(date +%s) - started )) s"
  for part in flash.log flash_split.log; do
    if [ -f "$OUTDIR/$part" ] && grep -q "^| " "$OUTDIR/$part"; then
      echo; echo "## ${part%.log}"; echo; grep -E "^(\||UNet step)" "$OUTDIR/$part"
    fi
  done
  if [ -f "$OUTDIR/pipeline.md" ]; then echo; echo "## pipeline vs diffusers"; echo; cat "$OUTDIR/pipeline.md"; fi
} >"$SUMMARY"
echo "wrote $SUMMARY"
cat "$SUMMARY"
