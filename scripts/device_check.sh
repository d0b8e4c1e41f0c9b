#!/usr/bin/env bash
# One prepared run on a GPU machine (H100/H200; Python 3.12, torch 2.11+cu130, nvcc 13, no
# network): build with CUDA for sm_90, run the test suite (CUDA-vs-CPU parity included),
# compute-sanitizer over a small CUDA smoke run, the SASS check, and the GPU benchmarks. Writes a
# summary and logs into $OUT (default ./device-out). Budget: about 8 minutes.
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

step build 420 env GPTOSS_EXT_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . || { cat "$SUMMARY"; exit 1; }
step import 60 $PY -c "import gptoss_ext, torch; assert gptoss_ext.has_cuda_kernels(); print(gptoss_ext.build_info)"
step sass 120 $PY scripts/check_sass.py
step tests 300 $PY -m pytest -q -x -m "not slow" -p no:cacheprovider
for s in scripts/cuda_smoke*.py; do  # every CUDA op once on small awkward shapes, vs the CPU kernel
  n=$(basename "$s" .py)
  step "memcheck_$n" 150 compute-sanitizer --tool memcheck --error-exitcode 1 $PY "$s"
  step "racecheck_$n" 150 compute-sanitizer --tool racecheck --error-exitcode 1 $PY "$s"
done
# GPU benchmarks: the op benchmarks that take --device (bench_moe: the MoE block's prefill at
# T=4096 vs cuBLAS dense bf16 on the same FLOPs and MXFP4 decode GB/s vs the device copy bandwidth,
# with transformers' GptOssMLP), and the MoE smoke script's per-kernel GPU timing. A GPU attention benchmark
# (prefill TFLOP/s at T=8192, decode GB/s) is still to be written.
for b in benchmarks/bench_rms_norm.py benchmarks/bench_rope.py; do
  step "$(basename "$b" .py)" 120 $PY "$b" --device cuda
done
step bench_moe 150 $PY benchmarks/bench_moe.py --device cuda
step bench_moe_kernels_cuda 120 $PY scripts/cuda_smoke_moe.py --bench
echo "total: $(( $(date +%s) - START ))s" | tee -a "$SUMMARY"
cat "$SUMMARY"
