#pragma once
// Helpers shared by the CUDA kernels in csrc/cuda/: aligned vectors, float loads, the row
// reduction used by the per-row kernels, launch-shape choices and device queries.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

namespace gptoss::cuda {

// N elements of T moved as one access: with sizeof(T) * N == 16 this is one 128-bit LDG/STG, so
// the address must be 16-byte aligned.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Elements of T per 16-byte vector.
template <typename T>
constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

// Accumulation type of a storage type: double for double, float otherwise.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// out[0..N) = p[0..N). For float with N % 4 == 0, p must be 16-byte aligned (float4 loads).
template <int N, typename A>
__device__ __forceinline__ void load_n(const A* __restrict__ p, A (&out)[N]) {
  if constexpr (std::is_same_v<A, float> && N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const float4 f = reinterpret_cast<const float4*>(p)[i];
      out[4 * i] = f.x;
      out[4 * i + 1] = f.y;
      out[4 * i + 2] = f.z;
      out[4 * i + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = p[i];
  }
}

// p[0..N) = in[0..N), same alignment rule as load_n.
template <int N, typename A>
__device__ __forceinline__ void store_n(A* __restrict__ p, const A (&in)[N]) {
  if constexpr (std::is_same_v<A, float> && N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i)
      reinterpret_cast<float4*>(p)[i] = make_float4(in[4 * i], in[4 * i + 1], in[4 * i + 2], in[4 * i + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = in[i];
  }
}

// Sum of v over the blockDim.x threads that share threadIdx.y (one row of a row kernel), returned
// to all of them. Contract: blockDim.x is a power of two <= 32 or a multiple of 32,
// blockDim.x * blockDim.y is a multiple of 32 and <= 1024, every thread of the block calls it
// (it may __syncthreads), and `red` (32 entries of shared memory) is not reused before the next
// __syncthreads (alternate two buffers in loops). Fixed order: deterministic.
template <typename A>
__device__ __forceinline__ A row_sum(A v, A* red) {
  const int tpr = blockDim.x;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    if (off < tpr) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (tpr <= 32) return v;
  const int tid = threadIdx.y * tpr + threadIdx.x;
  if ((tid & 31) == 0) red[tid >> 5] = v;
  __syncthreads();
  const int nw = tpr >> 5;
  const A* r = red + threadIdx.y * nw;
  A s = r[0];
  for (int i = 1; i < nw; ++i) s += r[i];
  return s;
}

// a / b and a % b, in 32 bits when both fit (the common case; 64-bit division is slow on GPUs).
__device__ __forceinline__ void divmod(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  if (((a | b) >> 32) == 0) {
    const uint32_t q32 = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
    q = q32;
    r = a - static_cast<int64_t>(q32) * b;
  } else {
    q = a / b;
    r = a - q * b;
  }
}

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// gridDim.x for n blocks, with a clear error past the CUDA limit.
inline unsigned grid_x(int64_t n, const char* op) {
  TORCH_CHECK(n > 0 && n <= std::numeric_limits<int32_t>::max(), op, ": tensor too large for one launch (",
              n, " blocks)");
  return static_cast<unsigned>(n);
}

// Streaming multiprocessors of the current device (queried once per device: launch paths ask).
inline int sm_count() {
  static std::atomic<int> cache[64];
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 0 && dev < 64) {
    const int c = cache[dev].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  if (dev >= 0 && dev < 64) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

// Launch shape of a row kernel: tpr threads per row (blockDim.x: a power of two <= 32 or a
// multiple of 32), rpb rows per block (blockDim.y), vpt vectors per thread.
struct RowShape {
  int vpt = 0;
  int tpr = 0;
  int rpb = 0;
};

// Threads per row for n work items per row: a power of two up to 32, else a multiple of 32.
inline int row_threads(int64_t n) {
  return n <= 32 ? next_pow2(n) : static_cast<int>(ceil_div(n, 32) * 32);
}

// Shape for a row of nvec vectors whose vectors all stay in registers (each thread holds at most
// vpt of them): the smallest vpt of `vpts` (ascending) that needs <= 256 threads per row, else
// the largest vpt if that needs <= max_tpr. Rows per block fill 256 threads. false: the row does
// not fit (use a streaming kernel).
template <size_t K>
inline bool pick_row_shape(int64_t nvec, const int (&vpts)[K], int max_tpr, RowShape& s) {
  for (size_t i = 0; i < K; ++i) {
    const int64_t need = ceil_div(nvec, vpts[i]);
    if (need <= 256 || (i + 1 == K && need <= max_tpr)) {
      s.vpt = vpts[i];
      s.tpr = row_threads(need);
      s.rpb = s.tpr >= 256 ? 1 : 256 / s.tpr;
      return true;
    }
  }
  return false;
}

// Shape for a streaming row kernel (loops over the row): up to 4 vectors per thread per pass,
// at most max_tpr threads per row.
inline RowShape stream_row_shape(int64_t nvec, int max_tpr) {
  RowShape s;
  s.vpt = 0;
  s.tpr = row_threads(std::min<int64_t>(ceil_div(nvec, 4), max_tpr));
  s.rpb = s.tpr >= 256 ? 1 : 256 / s.tpr;
  return s;
}

// Hint: bring the 128-byte line holding p into L2 (no register result, no ordering).
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
#endif
}

}  // namespace gptoss::cuda
