#!/usr/bin/env bash
# The GPU check (H100/H200; Python 3.12, torch 2.11+cu130, nvcc 13, no network), in phases run in
# this order (by value per device second):
#   build     build with CUDA for sm_90, import, SASS check                      (~70 s on 16 cores)
#   tests     the CUDA tests (-k cuda: CUDA-vs-CPU parity of every op, the CUDA model tests with
#             CUDA graph and compiled decode), pytest-xdist over 8 workers        (~65 s)
#   model     gpt-oss-20b decode at batch 1 vs its bandwidth floor, eager and CUDA graph (two
#             rounds), with a kernel profile of the step; the demo (CUDA vs CPU logits) (~40 s)
#   bench     GPU benchmarks: rms_norm, rope, attention, linear, MoE             (~1.5 min)
#   sanitize  compute-sanitizer memcheck + racecheck over scripts/cuda_smoke*.py (~40 s)
#   profile   Nsight Compute on the decode GEMV (not in the default set; ~1 min)
# Measured on an H100 (2026-11-27): build tests model 233 s (with a PDL rerun of the tests and four
# kernel variants since removed), bench sanitize 123 s. With 15 minutes of device time, start with
# `build tests model` (DEADLINE_S).
# `scripts/device_check.sh` runs build..sanitize; `scripts/device_check.sh build tests` runs those. The
# build stays on a warm machine between calls. DEADLINE_S=N (seconds from the start) shortens or
# skips the steps that would run past it, so one call can take what fits and say what it skipped.
# Writes $OUT/summary.txt and one log, $OUT/log.txt (the device tool returns at most 8 files).
# The CPU tests are not rerun here: CI runs them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
START=$(date +%s)

LOG="$OUT/log.txt"
: > "$LOG"
DEADLINE_S=${DEADLINE_S:-100000}
step() {  # step NAME TIMEOUT_S COMMAND...: run, append to $LOG, record pass/fail and time
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  local left=$(( START + DEADLINE_S - t0 - 5 ))
  if [ "$left" -lt 30 ]; then echo "$name: SKIPPED (deadline)" | tee -a "$SUMMARY"; return 99; fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "===== $name (limit ${limit}s) =====" >> "$LOG"
  local tmp; tmp=$(mktemp)
  PYTHONUNBUFFERED=1 timeout "$limit" "$@" > "$tmp" 2>&1
  local rc=$?
  cat "$tmp" >> "$LOG"
  local status=PASS; [ $rc -ne 0 ] && status="FAIL(rc=$rc)"
  echo "$name: $status ($(( $(date +%s) - t0 ))s)" | tee -a "$SUMMARY"
  tail -n 3 "$tmp" | sed 's/^/    /' >> "$SUMMARY"
  rm -f "$tmp"
  return $rc
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | grep -q . && echo '(dirty)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} | tee -a "$SUMMARY"

if ! $PY -c "import hypothesis" 2>/dev/null && ls wheelhouse/*.whl >/dev/null 2>&1; then
  $PY -m pip install --no-index --no-deps wheelhouse/*.whl >> "$LOG" 2>&1
fi

PHASES=${*:-build tests model bench sanitize}
has() { [[ " $PHASES " == *" $1 "* ]]; }

if has build; then
  step build 420 env GPTOSS_EXT_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . || { cat "$SUMMARY"; exit 1; }
fi
step import 60 $PY -c "import gptoss_ext, torch; assert gptoss_ext.has_cuda_kernels(); print(gptoss_ext.build_info)" \
  || { cat "$SUMMARY"; exit 1; }
has build && step sass 120 $PY scripts/check_sass.py
has tests && step tests 300 $PY -m pytest -q -m "not slow" -k cuda -p no:cacheprovider -n 8 --maxfail=25 -rfE
if has model; then
  # gpt-oss-20b decode at batch 1 (random MXFP4 weights, ~13 GB of GPU memory), eager and CUDA
  # graph, vs the bandwidth floor, two rounds. (CUDA graph == eager is tested in the tests phase.)
  step bench_model_cuda 300 $PY benchmarks/bench_model.py --device cuda --rounds 2
  step demo_cuda 180 $PY -m gptoss.demo  # `make demo`'s job; compares CUDA and CPU logits on a GPU
fi
if has bench; then
  # rms_norm and rope vs eager; attention: prefill TFLOP/s vs SDPA flash up to T=8192, backward,
  # decode KV GB/s vs the device copy bandwidth (~90 s); MoE: prefill T=4096 vs cuBLAS dense bf16
  # on the same FLOPs, MXFP4 decode GB/s vs the device copy bandwidth, transformers' GptOssMLP;
  # the MoE smoke script's per-kernel timings.
  for b in benchmarks/bench_rms_norm.py benchmarks/bench_rope.py; do
    step "$(basename "$b" .py)_cuda" 120 $PY "$b" --device cuda
  done
  step bench_attention_cuda 150 $PY benchmarks/bench_attention.py --device cuda
  step bench_linear_cuda 120 $PY benchmarks/bench_linear.py --device cuda
  step bench_moe_cuda 150 $PY benchmarks/bench_moe.py --device cuda
  step bench_moe_kernels_cuda 120 $PY scripts/cuda_smoke_moe.py --bench
fi
if has sanitize; then
  for s in scripts/cuda_smoke*.py; do  # every CUDA op once on small awkward shapes, vs the CPU kernel
    n=$(basename "$s" .py)
    step "memcheck_$n" 150 compute-sanitizer --tool memcheck --error-exitcode 1 $PY "$s"
    step "racecheck_$n" 150 compute-sanitizer --tool racecheck --error-exitcode 1 $PY "$s"
  done
fi
if has profile; then
  # Nsight Compute on the first two MXFP4 GEMV launches of the kernel benchmark (T = 1: mlp1, mlp2):
  # speed of light, occupancy, memory and warp-stall sections, for tuning the decode GEMV.
  # --clock-control none: ncu otherwise locks the clocks to base for the profile (never change them).
  step ncu_mxfp4_gemv 240 ncu --clock-control none --target-processes all -k regex:mxfp4_gemv --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section MemoryWorkloadAnalysis --section WarpStateStats \
    $PY scripts/cuda_smoke_moe.py --bench
fi
echo "total: $(( $(date +%s) - START ))s" | tee -a "$SUMMARY"
cat "$SUMMARY"
