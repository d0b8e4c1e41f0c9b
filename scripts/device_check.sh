#!/usr/bin/env bash
# The GPU check (H100/H200; Python 3.12, torch 2.11+cu130, nvcc 13, no network), in phases:
#   build     build with CUDA for sm_90, import, SASS check                      (~3-5 min on 16 cores)
#   tests     the test suite, CUDA-vs-CPU parity included (-x)                   (~3 min)
#   sanitize  compute-sanitizer memcheck + racecheck over scripts/cuda_smoke*.py (~3 min)
#   bench     GPU benchmarks: rms_norm, rope, attention, MoE                     (~5 min)
#   model     CUDA model tests (CUDA graph, compiled decode) and the 20b decode benchmark (~4 min)
# `scripts/device_check.sh` runs them all (more than one 10-minute device call: split it);
# `scripts/device_check.sh build tests` runs those phases. The build stays on a warm machine
# between calls, so a session runs e.g. `build tests` in one call and `sanitize bench model` in
# the next. Writes a summary and logs into $OUT (default ./device-out).
#
# Pure-Python test dependencies missing there (hypothesis and its deps) are installed from
# ./wheelhouse when present: before the run, on the build machine,
#   pip download --no-deps -d wheelhouse hypothesis==6.170.17 sortedcontainers attrs
# and pass `wheelhouse` in the device tool's carry list.
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

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, record pass/fail and time
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status=PASS; [ $rc -ne 0 ] && status="FAIL(rc=$rc)"
  echo "$name: $status ($(( $(date +%s) - t0 ))s)" | tee -a "$SUMMARY"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /' >> "$SUMMARY"
  return $rc
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | grep -q . && echo '(dirty)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} | tee -a "$SUMMARY"

if ! $PY -c "import hypothesis" 2>/dev/null && ls wheelhouse/*.whl >/dev/null 2>&1; then
  $PY -m pip install --no-index --no-deps wheelhouse/*.whl > "$OUT/wheelhouse.log" 2>&1
fi

PHASES=${*:-build tests sanitize bench model}
has() { [[ " $PHASES " == *" $1 "* ]]; }

if has build; then
  step build 420 env GPTOSS_EXT_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . || { cat "$SUMMARY"; exit 1; }
fi
step import 60 $PY -c "import gptoss_ext, torch; assert gptoss_ext.has_cuda_kernels(); print(gptoss_ext.build_info)" \
  || { cat "$SUMMARY"; exit 1; }
has build && step sass 120 $PY scripts/check_sass.py
has tests && step tests 300 $PY -m pytest -q -x -m "not slow" -p no:cacheprovider
if has sanitize; then
  for s in scripts/cuda_smoke*.py; do  # every CUDA op once on small awkward shapes, vs the CPU kernel
    n=$(basename "$s" .py)
    step "memcheck_$n" 150 compute-sanitizer --tool memcheck --error-exitcode 1 $PY "$s"
    step "racecheck_$n" 150 compute-sanitizer --tool racecheck --error-exitcode 1 $PY "$s"
  done
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
  step bench_moe_cuda 150 $PY benchmarks/bench_moe.py --device cuda
  step bench_moe_kernels_cuda 120 $PY scripts/cuda_smoke_moe.py --bench
fi
if has model; then
  # CUDA-graph decode == eager (also in the tests phase, which stops at the first failure), then
  # gpt-oss-20b decode at batch 1 (random MXFP4 weights, ~13 GB of GPU memory), eager and CUDA
  # graph, vs the bandwidth floor.
  step model_cuda 180 $PY -m pytest -q -p no:cacheprovider tests/test_model_cuda.py
  step bench_model_cuda 240 $PY benchmarks/bench_model.py --device cuda
fi
echo "total: $(( $(date +%s) - START ))s" | tee -a "$SUMMARY"
cat "$SUMMARY"
