#pragma once
// Helpers shared by the MoE CUDA kernels (csrc/cuda/moe*.cu, mxfp4.cu): the tensor-core PTX
// wrappers (from cuda/mma_sm80.cuh, shared with attention) and prmt, exact MXFP4 decoding that -ftz (--use_fast_math) cannot flush, block scans, the grouped-row tile schedule
// and the stable counting sort behind moe_dispatch.
//
// Tensor-core helpers need sm_80+; on older devices they trap, and the host code never selects a
// tensor-core kernel there (see has_sm80()).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cuda/mma_sm80.cuh"
#include "cuda/utils.cuh"

#include "common/moe_math.h"

namespace gptoss::cuda {

// ------------------------------------------------------------------------------ device facts

// True when the current device can run the tensor-core kernels (mma.sync bf16/f16, cp.async).
inline bool has_sm80() {
  int dev = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  return major >= 8;
}

// Opt-in shared memory per block of the current device.
inline int max_smem_optin() {
  int dev = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return n;
}

// ceil(a / b) for a >= 0, b > 0, on host and device.
__host__ __device__ __forceinline__ constexpr int64_t ceil_div_dev(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------ PTX wrappers
// (one copy of each, cuda/mma_sm80.cuh)
using sm80::cp_async_16;
using sm80::cp_async_commit;
using sm80::cp_async_wait;
using sm80::kIsBf16;
using sm80::ldmatrix_x4;
using sm80::mma_16816;
using sm80::pack2;
using sm80::smem_u32;

// PTX prmt.b32 in its default mode: output byte i is source byte sel[4i+2:4i] of {b, a} (a = bytes
// 0-3, b = bytes 4-7), or, when sel bit 4i+3 is set, that byte's sign bit replicated over 8 bits.
// (Inline PTX because __byte_perm documents only the 3-bit index.)
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// ----------------------------------------------------------------------------- 16-bit values

// The quiet NaN of a storage type (bad-input marker rows).
template <typename T>
__host__ __device__ __forceinline__ T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

// ------------------------------------------------------------------------------------- MXFP4

// FP4_VALUES[nibble] * 2^(scale - 127) as float bits, built with integer operations: exact, float
// subnormals included (scale bytes 0 and 1), +-inf past float's range, -0 for nibble 8. Same values
// as gptoss::mxfp4_value (common/moe_math.h) without an FMUL that -ftz could flush.
__host__ __device__ __forceinline__ uint32_t mxfp4_float_bits(uint32_t nibble, uint32_t scale) {
  const uint32_t sign = (nibble & 8u) << 28;
  const uint32_t mag = nibble & 7u;
  if (mag == 0u) return sign;
  // twice the value = (1 + m/2) * 2^e2: magnitude 1 (0.5) is 2^0, else e2 = exponent bits, m = mantissa bit
  const int e2 = mag == 1u ? 0 : static_cast<int>(mag >> 1);
  const uint32_t m = mag == 1u ? 0u : (mag & 1u);
  const int x = e2 + static_cast<int>(scale) - 128;  // value = (1 + m/2) * 2^x, x in [-128, 130]
  if (x > 127) return sign | 0x7F800000u;
  if (x >= -126) return sign | (static_cast<uint32_t>(x + 127) << 23) | (m << 22);
  return sign | ((2u + m) << (x + 148));  // subnormal: (2 + m) * 2^(x - 1), in units of 2^-149
}

__host__ __device__ __forceinline__ float mxfp4_float(uint32_t nibble, uint32_t scale) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(mxfp4_float_bits(nibble, scale));
#else
  const uint32_t b = mxfp4_float_bits(nibble, scale);
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

// The same value as a double (always normal in double).
__host__ __device__ __forceinline__ double mxfp4_double(uint32_t nibble, uint32_t scale) {
  const uint64_t sign = static_cast<uint64_t>(nibble & 8u) << 60;
  const uint32_t mag = nibble & 7u;
  uint64_t bits = sign;
  if (mag != 0u) {
    const int e2 = mag == 1u ? 0 : static_cast<int>(mag >> 1);
    const uint64_t m = mag == 1u ? 0u : (mag & 1u);
    const int x = e2 + static_cast<int>(scale) - 128;
    bits |= (static_cast<uint64_t>(x + 1023) << 52) | (m << 51);
  }
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(bits));
#else
  double d;
  std::memcpy(&d, &bits, sizeof d);
  return d;
#endif
}

// bfloat16 bits of twice the E2M1 magnitudes 0..7 ({0, 1, 2, 3, 4, 6, 8, 12}), as prmt tables:
// high bytes (kTwiceHi0 = entries 0-3, kTwiceHi1 = 4-7) and low bytes.
constexpr uint32_t kTwiceHi0 = 0x40403F00u, kTwiceHi1 = 0x41414040u;
constexpr uint32_t kTwiceLo0 = 0x40008000u, kTwiceLo1 = 0x4000C080u;

// Eight E2M1 nibbles (element i = bits 4i..4i+3, i.e. the low nibble of each byte first) -> four
// bfloat16x2 registers of TWICE their values, natural order: out[j] = (element 2j, element 2j+1),
// the even element in the low half. Signs kept (-0 for nibble 8). Twice the values are small
// integers, exact in bfloat16 and never subnormal. 17 integer instructions.
__device__ __forceinline__ void decode8_twice_bf16(uint32_t w, uint32_t (&out)[4]) {
  const uint32_t wh = w >> 16;
  const uint32_t sel_lo = w & 0x7777u, sel_hi = wh & 0x7777u;  // magnitudes of elements 0-3, 4-7
  uint32_t h_lo = prmt(kTwiceHi0, kTwiceHi1, sel_lo), l_lo = prmt(kTwiceLo0, kTwiceLo1, sel_lo);
  uint32_t h_hi = prmt(kTwiceHi0, kTwiceHi1, sel_hi), l_hi = prmt(kTwiceLo0, kTwiceLo1, sel_hi);
  // Signs: with the full nibble as selector, a set bit 3 replicates 0x80's sign (0xFF), a clear one
  // copies 0x80; bit 0 of output byte i is then element i's sign, moved to bit 7 (the bf16 sign).
  const uint32_t sg_lo = prmt(0x80808080u, 0x80808080u, w), sg_hi = prmt(0x80808080u, 0x80808080u, wh);
  h_lo |= (sg_lo << 7) & 0x80808080u;
  h_hi |= (sg_hi << 7) & 0x80808080u;
  out[0] = prmt(l_lo, h_lo, 0x5140u);  // bytes: lo(e0), hi(e0), lo(e1), hi(e1)
  out[1] = prmt(l_lo, h_lo, 0x7362u);
  out[2] = prmt(l_hi, h_hi, 0x5140u);
  out[3] = prmt(l_hi, h_hi, 0x7362u);
}

// bfloat16 bits of 2^(scale - 128) (the factor that turns twice an E2M1 value into its MXFP4
// value): exponent field scale - 1, or the subnormals 2^-127 (scale 1) and 2^-128 (scale 0).
__device__ __forceinline__ uint32_t bf16_half_scale(uint32_t scale) {
  return scale >= 2u ? (scale - 1u) << 7 : (0x20u << scale);
}

// x * y on bfloat16x2 registers (exact here: powers of two times values with 2 significant bits).
__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t x, uint32_t y) {
  GPTOSS_NEED_SM80();
#if GPTOSS_HAS_SM80
  const __nv_bfloat162 r = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&x),
                                   *reinterpret_cast<const __nv_bfloat162*>(&y));
  return *reinterpret_cast<const uint32_t*>(&r);
#else
  return 0u;
#endif
}

// --------------------------------------------------------------------------------- block scan

// Inclusive scan of v over the whole block with an associative op and its identity; *total gets
// the block's total. Contract: blockDim.x is a multiple of 32 (<= 1024), every thread calls it,
// `sh` holds 32 entries and is free; it is free again on return (ends with __syncthreads).
template <typename V, typename Op>
__device__ __forceinline__ V block_inclusive_scan(V v, Op op, V identity, V* sh, V* total) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const V u = __shfl_up_sync(0xffffffffu, v, off);
    if (lane >= off) v = op(u, v);
  }
  if (lane == 31) sh[wid] = v;
  __syncthreads();
  if (wid == 0) {
    V w = lane < nw ? sh[lane] : identity;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const V u = __shfl_up_sync(0xffffffffu, w, off);
      if (lane >= off) w = op(u, w);
    }
    sh[lane] = w;
  }
  __syncthreads();
  if (wid > 0) v = op(sh[wid - 1], v);
  *total = sh[nw - 1];
  __syncthreads();
  return v;
}

struct MaxOp {
  __device__ __forceinline__ int32_t operator()(int32_t a, int32_t b) const { return a > b ? a : b; }
};
struct AddOp {
  __device__ __forceinline__ int32_t operator()(int32_t a, int32_t b) const { return a + b; }
};

// ------------------------------------------------------------------------------ tile schedule

// Grouped-row tile schedule of the grouped GEMMs, one block of 1024 threads. From offsets [E+1]
// (trusted to come from moe_dispatch, but never trusted for memory safety) it writes
//   so [E+1]: sanitized offsets, so[e] = clamp(max(offsets[0..e]), 0, n_rows): nondecreasing, so
//             experts never overlap and every row index stays in [0, n_rows);
//   tile_start [E+1]: exclusive prefix sum of ceil((so[e+1] - so[e]) / bm), tile_start[E] = total.
// Rows owned by no expert ([0, so[0]) and [so[E], n_rows), non-empty only for bad offsets, e.g.
// after moe_dispatch saw out-of-range expert ids) are filled with NaN in `out` ([n_rows, out_cols],
// skipped when out is null), so that bad routing shows up as NaN instead of stale memory.
template <typename OutT>
__global__ void __launch_bounds__(1024)
    moe_schedule_kernel(const int32_t* __restrict__ offsets, int num_experts, int n_rows, int bm,
                        int32_t* __restrict__ so, int32_t* __restrict__ tile_start, OutT* __restrict__ out,
                        int64_t out_cols) {
  __shared__ int32_t sh[32];
  int32_t carry = 0, total = 0;
  for (int base = 0; base <= num_experts; base += blockDim.x) {
    const int i = base + threadIdx.x;
    int32_t v = i <= num_experts ? min(max(offsets[i], 0), n_rows) : 0;
    v = block_inclusive_scan(v, MaxOp{}, int32_t{0}, sh, &total);
    v = max(v, carry);
    if (i <= num_experts) so[i] = v;
    carry = max(carry, total);
  }
  __syncthreads();  // so[] complete and visible to the block
  carry = 0;
  for (int base = 0; base <= num_experts; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const int32_t cnt = i < num_experts ? (so[i + 1] - so[i] + bm - 1) / bm : 0;
    const int32_t incl = block_inclusive_scan(cnt, AddOp{}, int32_t{0}, sh, &total);
    if (i <= num_experts) tile_start[i] = carry + incl - cnt;
    carry += total;
  }
  if (out != nullptr) {
    const int64_t head = so[0], tail_start = so[num_experts];
    const int64_t bad = head + (n_rows - tail_start);
    for (int64_t j = threadIdx.x; j < bad * out_cols; j += blockDim.x) {
      const int64_t r = j / out_cols, c = j - r * out_cols;
      const int64_t row = r < head ? r : tail_start + (r - head);
      out[row * out_cols + c] = quiet_nan<OutT>();
    }
  }
}

// Expert of grouped row tile rt: the e with tile_start[e] <= rt < tile_start[e+1] (rt < total).
__device__ __forceinline__ int tile_expert(const int32_t* __restrict__ tile_start, int num_experts, int rt) {
  int lo = 0, hi = num_experts;  // invariant: tile_start[lo] <= rt < tile_start[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (tile_start[mid] <= rt) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Device-side schedule: int32 [2, E+1] (row 0 = so, row 1 = tile_start).
struct Schedule {
  at::Tensor buf;
  const int32_t* so() const { return buf.const_data_ptr<int32_t>(); }
  const int32_t* tile_start() const { return buf.const_data_ptr<int32_t>() + buf.size(1); }
};

// Upper bound of the schedule's total tiles: sum_e ceil(n_e / bm) <= (n_rows + E * (bm - 1)) / bm.
inline int64_t max_row_tiles(int64_t n_rows, int64_t num_experts, int64_t bm) {
  return (n_rows + num_experts * (bm - 1)) / bm;
}

// ------------------------------------------------------------------------ stable counting sort

// Stable counting sort of int32 keys on the device (no host sync). keys [n] with n < 2^31; a key
// outside [0, bins) counts as bin `bins` (after every valid key). Writes
//   perm [n]: source positions grouped by key, ascending within a key (so perm is a permutation);
//   row_of (optional, may be null) [n]: perm / div;
//   starts [bins+1]: bin b owns perm[starts[b] .. starts[b+1]); starts[bins] = number of valid keys.
// Implemented in moe.cu: per-chunk histograms (one warp per chunk, __match_any_sync), one
// single-block exclusive scan over the [bins+1, chunks] count matrix in bin-major order, and a
// scatter that replays each chunk in order (ranks from the match masks): deterministic.
void counting_sort(const int32_t* keys, int64_t n, int64_t bins, int32_t* perm, int32_t* row_of, int64_t div,
                   int32_t* starts, const at::TensorOptions& int_opts, cudaStream_t stream);

// ------------------------------------------------------------------ decode-sized MoE (moe.cu)

// moe_decode_prep: the routing, dispatch and GEMV schedule of n = T k <= kPrepMaxSlots slots over
// E <= kPrepMaxExperts experts in one launch (one block). logits [T, E] contiguous (T); writes
// weights [T, k] (acc dtype), and int32 order [n], row_token [n], inv [n] (inv[order[p]] = p), so
// [E+1] (offsets), tile_start [E+1] (one tile per non-empty expert): what moe_route, moe_dispatch,
// the GEMV's make_schedule and moe_combine's inverse would produce, bit for bit.
constexpr int kPrepMaxSlots = 256, kPrepMaxExperts = 1024;
void moe_decode_prep(const at::Tensor& logits, int64_t k, at::Tensor& weights, int32_t* order, int32_t* row_token,
                     int32_t* inv, int32_t* so, int32_t* tile_start, cudaStream_t stream);

// moe_combine's kernel with a precomputed inverse permutation: out [T, d] = sum_j weights[t, j] *
// y[inv[t k + j]] (y [N, d] contiguous, weights [T, k] in the acc dtype).
void launch_combine(const at::Tensor& y, const int32_t* inv, const at::Tensor& weights, at::Tensor& out,
                    cudaStream_t stream);

}  // namespace gptoss::cuda
