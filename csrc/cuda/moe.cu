// MoE routing, dispatch, SwiGLU and combine on CUDA (spec §2.4); contracts in registration.cpp,
// argument checks in common/checks.cpp, element math in common/moe_math.h (shared with the CPU).
//
// moe_route: one warp per token, k arg-max passes (lower index wins ties, NaN first), softmax over
//   the k picks in the accumulation dtype.
// moe_route_backward: one warp per token; lane 0 adds the k gradients in slot order (duplicate ids
//   would add up, deterministically).
// moe_dispatch: device counting sort (counting_sort below; stable, deterministic, no host sync).
//   Expert ids outside [0, E) cannot raise without a sync: such slots are sorted after every valid
//   slot, so offsets[E] (= the number of valid slots) is then < N. That is the signal: the grouped
//   GEMMs own no row past offsets[E] and write those rows as NaN, so the MoE output of the affected
//   tokens is NaN (the CPU kernel raises instead). A caller that wants an error checks
//   offsets[-1] == N (one host sync).
// swiglu / swiglu_backward: flat elementwise (out[o] from h[2o], h[2o+1]), 16-byte vectors.
// moe_combine: inverse permutation of `order`, then each token gathers its k rows (no atomics).
// moe_combine_backward: grad_y row by row through `order`; grad_weights one warp per slot.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "cuda/moe_common.cuh"  // (includes common/moe_math.h)
#include "cuda/utils.cuh"
#include "ops.h"

namespace gptoss::cuda {

// ------------------------------------------------------------------------ stable counting sort

namespace {

constexpr int kSortWarps = 4;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ int sort_bin(int32_t key, int bins) { return key >= 0 && key < bins ? key : bins; }

// counts [(bins+1) * nc], zero on entry; counts[b * nc + c] = number of keys of bin b in chunk c.
// Chunk c = positions [c * chunk, min(n, (c+1) * chunk)), one warp, 32 positions per step; the bin's
// lowest lane adds the bin's count (each (b, c) entry has one writer per step; __syncwarp orders
// the steps).
__global__ void __launch_bounds__(kSortWarps * 32)
    sort_count_kernel(const int32_t* __restrict__ keys, int64_t n, int bins, int64_t chunk, int64_t nc,
                      int32_t* __restrict__ counts) {
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kSortWarps + (threadIdx.x >> 5);
  if (c >= nc) return;  // whole warp
  const int64_t start = c * chunk, end = min(n, start + chunk);
  for (int64_t base = start; base < end; base += 32) {
    const int64_t s = base + lane;
    const bool in = s < end;
    const unsigned act = __ballot_sync(kFull, in);
    if (in) {
      const int b = sort_bin(keys[s], bins);
      const unsigned peers = __match_any_sync(act, b);
      if (lane == __ffs(peers) - 1) counts[b * nc + c] += __popc(peers);
    }
    __syncwarp();
  }
}

// In-place exclusive prefix sum of data [L] (bin-major [(bins+1), nc]: entry (b, c) becomes the
// first output position of bin b's keys from chunk c), then starts[b] = data[b * nc] for b <= bins.
// One block of 1024 threads, 4 entries per thread per pass. Totals fit int32 (they are <= n < 2^31).
__global__ void __launch_bounds__(1024)
    sort_scan_kernel(int32_t* __restrict__ data, int64_t L, int64_t nc, int bins, int32_t* __restrict__ starts) {
  constexpr int kPer = 4;
  __shared__ int32_t sh[32];
  int32_t carry = 0, total = 0;
  for (int64_t base = 0; base < L; base += 1024 * kPer) {
    const int64_t i0 = base + static_cast<int64_t>(threadIdx.x) * kPer;
    int32_t v[kPer];
    int32_t sum = 0;
#pragma unroll
    for (int p = 0; p < kPer; ++p) {
      v[p] = i0 + p < L ? data[i0 + p] : 0;
      sum += v[p];
    }
    const int32_t incl = block_inclusive_scan(sum, AddOp{}, int32_t{0}, sh, &total);
    int32_t run = carry + incl - sum;
#pragma unroll
    for (int p = 0; p < kPer; ++p) {
      if (i0 + p < L) data[i0 + p] = run;
      run += v[p];
    }
    carry += total;
  }
  __syncthreads();
  for (int b = threadIdx.x; b <= bins; b += blockDim.x) starts[b] = data[static_cast<int64_t>(b) * nc];
}

// Replays the chunks of sort_count_kernel: the key at position s goes to pos[(b, c)] + (number of
// earlier positions of the same bin in this step), then the bin's lowest lane advances pos[(b, c)]
// (between two __syncwarp, after every lane has read it). Positions ascend within a bin: stable.
__global__ void __launch_bounds__(kSortWarps * 32, 8)
    sort_scatter_kernel(const int32_t* __restrict__ keys, int64_t n, int bins, int64_t chunk, int64_t nc,
                        int32_t* __restrict__ pos, int32_t* __restrict__ perm, int32_t* __restrict__ row_of,
                        int32_t div) {
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kSortWarps + (threadIdx.x >> 5);
  if (c >= nc) return;  // whole warp
  const int64_t start = c * chunk, end = min(n, start + chunk);
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t base = start; base < end; base += 32) {
    const int64_t s = base + lane;
    const bool in = s < end;
    const unsigned act = __ballot_sync(kFull, in);
    int b = 0;
    unsigned peers = 0;
    if (in) {
      b = sort_bin(keys[s], bins);
      peers = __match_any_sync(act, b);
      const int32_t dst = pos[b * nc + c] + __popc(peers & lanes_below);
      perm[dst] = static_cast<int32_t>(s);
      if (row_of != nullptr) row_of[dst] = static_cast<int32_t>(s / div);
    }
    __syncwarp();
    if (in && lane == __ffs(peers) - 1) pos[b * nc + c] += __popc(peers);
    __syncwarp();
  }
}

}  // namespace

void counting_sort(const int32_t* keys, int64_t n, int64_t bins, int32_t* perm, int32_t* row_of, int64_t div,
                   int32_t* starts, const at::TensorOptions& int_opts, cudaStream_t stream) {
  TORCH_CHECK(bins >= 1 && bins < std::numeric_limits<int32_t>::max(), "counting_sort: bins must be in [1, 2^31-1), got ",
              bins);
  TORCH_CHECK(n >= 0 && n < std::numeric_limits<int32_t>::max(), "counting_sort: n must be < 2^31-1, got ", n);
  TORCH_CHECK(div >= 1 && div <= std::numeric_limits<int32_t>::max(), "counting_sort: bad divisor ", div);
  if (n == 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(starts, 0, sizeof(int32_t) * (bins + 1), stream));
    return;
  }
  // Chunks of >= 256 keys (a multiple of 32), few enough that the count matrix stays ~<= 2^20.
  const int64_t max_chunks = std::max<int64_t>(1, (int64_t{1} << 20) / (bins + 1));
  const int64_t chunk = std::max<int64_t>(256, ceil_div(ceil_div(n, max_chunks), 32) * 32);
  const int64_t nc = ceil_div(n, chunk);
  at::Tensor counts = at::zeros({(bins + 1) * nc}, int_opts);
  int32_t* cnt = counts.mutable_data_ptr<int32_t>();
  const unsigned blocks = grid_x(ceil_div(nc, kSortWarps), "counting_sort");
  sort_count_kernel<<<blocks, kSortWarps * 32, 0, stream>>>(keys, n, static_cast<int>(bins), chunk, nc, cnt);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sort_scan_kernel<<<1, 1024, 0, stream>>>(cnt, (bins + 1) * nc, nc, static_cast<int>(bins), starts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sort_scatter_kernel<<<blocks, kSortWarps * 32, 0, stream>>>(keys, n, static_cast<int>(bins), chunk, nc, cnt, perm,
                                                             row_of, static_cast<int32_t>(div));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

// ------------------------------------------------------------------------------------ routing

constexpr int kRouteWarps = 8;

// "a comes before b" in the descending top-k order: larger value first, NaN before every number,
// ties (NaN vs NaN included) to the lower index. A strict total order on (value, index) pairs.
template <typename A>
__device__ __forceinline__ bool route_before(A a, int ia, A b, int ib) {
  const bool an = a != a, bn = b != b;
  if (an || bn) return an && bn ? ia < ib : an;
  if (a != b) return a > b;
  return ia < ib;
}

// The k picks and their softmax for one token, by one warp: row [E] logits; w [k] (accumulation
// dtype A), ex [k] int32 (global or shared memory). Pick j is the first entry, in the order above,
// among the entries after pick j-1 (so no per-entry "taken" state; ties resolve exactly as the
// stable descending sort of the reference). Pass j parks the picked logit in w[j]; the softmax then
// replaces it.
template <typename T>
__device__ __forceinline__ void route_token(const T* __restrict__ row, int E, int k, acc_t<T>* w, int32_t* ex) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  A prev_v = 0, top = 0;
  int prev_i = -1;
  for (int j = 0; j < k; ++j) {
    A best_v = 0;
    int best_i = -1;
    for (int i = lane; i < E; i += 32) {
      const A v = static_cast<A>(row[i]);
      if (prev_i >= 0 && !route_before(prev_v, prev_i, v, i)) continue;
      if (best_i < 0 || route_before(v, i, best_v, best_i)) {
        best_v = v;
        best_i = i;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const A ov = __shfl_xor_sync(kFull, best_v, off);
      const int oi = __shfl_xor_sync(kFull, best_i, off);
      if (oi >= 0 && (best_i < 0 || route_before(ov, oi, best_v, best_i))) {
        best_v = ov;
        best_i = oi;
      }
    }
    // Every lane holds the same pick; k <= E guarantees one is left (best_i >= 0).
    prev_v = best_v;
    prev_i = best_i;
    if (j == 0) top = best_v;
    if (lane == 0) {
      w[j] = best_v;
      ex[j] = best_i;
    }
  }
  __syncwarp();  // lane 0's stores are visible to the warp
  A sum = 0;
  for (int j = lane; j < k; j += 32) sum += exp(w[j] - top);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(kFull, sum, off);
  __syncwarp();
  for (int j = lane; j < k; j += 32) w[j] = exp(w[j] - top) / sum;
}

// One warp per token. logits [T, E] contiguous; weights [T, k] (accumulation dtype A), experts
// [T, k] int32.
template <typename T>
__global__ void __launch_bounds__(kRouteWarps * 32)
    moe_route_kernel(const T* __restrict__ logits, int64_t n_tokens, int E, int k, acc_t<T>* __restrict__ weights,
                     int32_t* __restrict__ experts) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + (threadIdx.x >> 5);
  if (t >= n_tokens) return;  // whole warp
  route_token(logits + t * E, E, k, weights + t * k, experts + t * k);
}

// Routing, dispatch and the decode GEMV schedule of a few tokens in one block of kRouteWarps warps
// (moe_decode_prep below): n = T k <= kPrepMaxSlots slots, E <= kPrepMaxExperts.
//   1. route_token per token (warp-strided), experts into shared memory;
//   2. histogram of the n expert ids (shared atomics), then warp 0 scans it: so = offsets [E+1]
//      (exclusive prefix sum, so[E] = n) and tile_start [E+1] = number of non-empty experts before e
//      (one GEMV "tile" per expert with rows, as make_schedule with bm >= n);
//   3. slot i (expert e) goes to position so[e] + (number of earlier slots of expert e): the stable
//      order of moe_dispatch. order[pos] = i, row_token[pos] = i / k, inv[i] = pos.
template <typename T>
__global__ void __launch_bounds__(kRouteWarps * 32)
    moe_decode_prep_kernel(const T* __restrict__ logits, int n_tokens, int E, int k, acc_t<T>* __restrict__ weights,
                           int32_t* __restrict__ order, int32_t* __restrict__ row_token, int32_t* __restrict__ inv,
                           int32_t* __restrict__ so, int32_t* __restrict__ tile_start) {
  __shared__ int32_t key[kPrepMaxSlots];
  __shared__ int32_t hist[kPrepMaxExperts + 1];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n = n_tokens * k;
  for (int t = warp; t < n_tokens; t += kRouteWarps) route_token(logits + static_cast<int64_t>(t) * E, E, k,
                                                                weights + static_cast<int64_t>(t) * k, key + t * k);
  for (int e = tid; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  for (int i = tid; i < n; i += blockDim.x) atomicAdd(&hist[key[i]], 1);
  __syncthreads();
  if (warp == 0) {  // lane l scans experts [l * per, (l + 1) * per)
    const int per = (E + 31) / 32, e0 = min(E, lane * per), e1 = min(E, e0 + per);
    int rows = 0, tiles = 0;
    for (int e = e0; e < e1; ++e) {
      rows += hist[e];
      tiles += hist[e] > 0;
    }
    int rows_incl = rows, tiles_incl = tiles;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int r = __shfl_up_sync(kFull, rows_incl, off), c = __shfl_up_sync(kFull, tiles_incl, off);
      if (lane >= off) {
        rows_incl += r;
        tiles_incl += c;
      }
    }
    int r = rows_incl - rows, c = tiles_incl - tiles;
    for (int e = e0; e < e1; ++e) {
      const int h = hist[e];
      so[e] = r;
      tile_start[e] = c;
      hist[e] = r;  // now the expert's first position
      r += h;
      c += h > 0;
    }
    if (lane == 31) {
      so[E] = rows_incl;
      tile_start[E] = tiles_incl;
    }
  }
  __syncthreads();
  for (int i = tid; i < n; i += blockDim.x) {
    const int e = key[i];
    int rank = 0;
    for (int j = 0; j < i; ++j) rank += key[j] == e;
    const int pos = hist[e] + rank;
    order[pos] = i;
    row_token[pos] = i / k;
    inv[i] = pos;
  }
}

// One warp per token: dot = sum_j w_j g_j, then grad[t, e_j] += w_j (g_j - dot) in slot order by
// lane 0 (grad zero on entry; ids outside [0, E) are skipped: moe_route never produces them).
template <typename G, typename A>
__global__ void __launch_bounds__(kRouteWarps * 32)
    moe_route_bwd_kernel(const G* __restrict__ gw, const A* __restrict__ w, const int32_t* __restrict__ ex,
                         int64_t n_tokens, int k, int64_t E, A* __restrict__ grad) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + (threadIdx.x >> 5);
  if (t >= n_tokens) return;
  const int64_t o = t * k;
  A dot = 0;
  for (int j = lane; j < k; j += 32) dot += w[o + j] * static_cast<A>(gw[o + j]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(kFull, dot, off);
  if (lane == 0) {
    A* g = grad + t * E;
    for (int j = 0; j < k; ++j) {
      const int32_t e = ex[o + j];
      if (e >= 0 && e < E) g[e] += w[o + j] * (static_cast<A>(gw[o + j]) - dot);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits_in, int64_t k) {
  check_moe_route(logits_in, k);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E < std::numeric_limits<int32_t>::max(), "moe_route: E must be < 2^31 on CUDA, got ", E);
  const auto acc = acc_dtype(logits.scalar_type());
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(acc));
  at::Tensor experts = at::empty({T, k}, logits.options().dtype(at::kInt));
  if (T == 0) return {weights, experts};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = grid_x(ceil_div(T, kRouteWarps), "moe_route");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moe_route_cuda", [&] {
    moe_route_kernel<scalar_t><<<blocks, kRouteWarps * 32, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), T, static_cast<int>(E), static_cast<int>(k),
        weights.mutable_data_ptr<acc_t<scalar_t>>(), experts.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {weights, experts};
}

at::Tensor moe_route_backward(const at::Tensor& grad_weights_in, const at::Tensor& weights_in,
                              const at::Tensor& experts_in, int64_t num_experts) {
  check_moe_route_backward(grad_weights_in, weights_in, experts_in, num_experts);
  const c10::cuda::CUDAGuard guard(weights_in.device());
  const at::Tensor gw = grad_weights_in.contiguous(), w = weights_in.contiguous(), ex = experts_in.contiguous();
  const int64_t T = w.size(0), k = w.size(1);
  at::Tensor grad = at::zeros({T, num_experts}, w.options());
  if (T == 0 || k == 0) return grad;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = grid_x(ceil_div(T, kRouteWarps), "moe_route_backward");
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "moe_route_backward_cuda", [&] {
    using A = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gw.scalar_type(), "moe_route_backward_cuda", [&] {
      moe_route_bwd_kernel<scalar_t, A><<<blocks, kRouteWarps * 32, 0, stream>>>(
          gw.const_data_ptr<scalar_t>(), w.const_data_ptr<A>(), ex.const_data_ptr<int32_t>(), T,
          static_cast<int>(k), num_experts, grad.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_dispatch(const at::Tensor& experts_in, int64_t num_experts) {
  check_moe_dispatch(experts_in, num_experts);
  TORCH_CHECK(num_experts < std::numeric_limits<int32_t>::max(), "moe_dispatch: num_experts must be < 2^31-1, got ",
              num_experts);
  const c10::cuda::CUDAGuard guard(experts_in.device());
  const at::Tensor experts = experts_in.contiguous();
  const int64_t n = experts.numel(), k = experts.size(1);
  const auto iopts = experts.options();
  at::Tensor order = at::empty({n}, iopts), row_token = at::empty({n}, iopts);
  at::Tensor offsets = at::empty({num_experts + 1}, iopts);
  counting_sort(experts.const_data_ptr<int32_t>(), n, num_experts, order.mutable_data_ptr<int32_t>(),
                row_token.mutable_data_ptr<int32_t>(), k, offsets.mutable_data_ptr<int32_t>(), iopts,
                c10::cuda::getCurrentCUDAStream());
  return {order, row_token, offsets};
}

// ------------------------------------------------------------------------------------- SwiGLU

// Grid-stride over output vectors of VW elements: out[o] = swiglu(h[2o], h[2o+1]). h [2 * n_out],
// out [n_out], both 16-byte aligned when VW > 1; the last n_out % VW outputs take the scalar tail.
template <typename T, int VW>
__global__ void __launch_bounds__(256)
    swiglu_kernel(const T* __restrict__ h, T* __restrict__ out, int64_t n_out, acc_t<T> alpha, acc_t<T> limit) {
  using A = acc_t<T>;
  using V = Vec<T, VW>;
  const int64_t nvec = n_out / VW;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t v = tid; v < nvec; v += stride) {
    const V hv[2] = {reinterpret_cast<const V*>(h)[2 * v], reinterpret_cast<const V*>(h)[2 * v + 1]};
    V o;
#pragma unroll
    for (int e = 0; e < VW; ++e) {
      const int i0 = 2 * e, i1 = 2 * e + 1;  // positions in the 2*VW inputs (VW = 1: one in each vector)
      o.v[e] = static_cast<T>(swiglu_fwd<A>(static_cast<A>(hv[i0 / VW].v[i0 % VW]),
                                            static_cast<A>(hv[i1 / VW].v[i1 % VW]), alpha, limit));
    }
    reinterpret_cast<V*>(out)[v] = o;
  }
  for (int64_t i = nvec * VW + tid; i < n_out; i += stride)
    out[i] = static_cast<T>(swiglu_fwd<A>(static_cast<A>(h[2 * i]), static_cast<A>(h[2 * i + 1]), alpha, limit));
}

// grad_h[2o], grad_h[2o+1] from h[2o], h[2o+1] and dy[o]; same layout contract as swiglu_kernel.
template <typename T, int VW>
__global__ void __launch_bounds__(256)
    swiglu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ h, T* __restrict__ dh, int64_t n_out,
                      acc_t<T> alpha, acc_t<T> limit) {
  using A = acc_t<T>;
  using V = Vec<T, VW>;
  const int64_t nvec = n_out / VW;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t v = tid; v < nvec; v += stride) {
    const V g = reinterpret_cast<const V*>(dy)[v];
    V hv[2] = {reinterpret_cast<const V*>(h)[2 * v], reinterpret_cast<const V*>(h)[2 * v + 1]};
    V o[2];
#pragma unroll
    for (int e = 0; e < VW; ++e) {
      const int i0 = 2 * e, i1 = 2 * e + 1;  // positions in the 2*VW inputs
      A dglu, dlin;
      swiglu_bwd<A>(static_cast<A>(hv[i0 / VW].v[i0 % VW]), static_cast<A>(hv[i1 / VW].v[i1 % VW]), alpha, limit,
                    static_cast<A>(g.v[e]), &dglu, &dlin);
      o[i0 / VW].v[i0 % VW] = static_cast<T>(dglu);
      o[i1 / VW].v[i1 % VW] = static_cast<T>(dlin);
    }
    reinterpret_cast<V*>(dh)[2 * v] = o[0];
    reinterpret_cast<V*>(dh)[2 * v + 1] = o[1];
  }
  for (int64_t i = nvec * VW + tid; i < n_out; i += stride) {
    A dglu, dlin;
    swiglu_bwd<A>(static_cast<A>(h[2 * i]), static_cast<A>(h[2 * i + 1]), alpha, limit, static_cast<A>(dy[i]), &dglu,
                  &dlin);
    dh[2 * i] = static_cast<T>(dglu);
    dh[2 * i + 1] = static_cast<T>(dlin);
  }
}

// Blocks of 256 threads for n_vec vectors: enough to fill the device, no more than the work.
unsigned elementwise_blocks(int64_t n_vec) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n_vec, 256), sm_count() * 16)));
}

at::Tensor swiglu(const at::Tensor& h_in, double alpha, double limit) {
  check_swiglu(h_in, alpha, limit);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  auto shape = h.sizes().vec();
  shape.back() /= 2;
  at::Tensor out = at::empty(shape, h.options());
  const int64_t n_out = out.numel();
  if (n_out == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "swiglu_cuda", [&] {
    using A = acc_t<scalar_t>;
    constexpr int VW = kVec16<scalar_t>;
    const bool vec = is_aligned(h.const_data_ptr(), 16) && is_aligned(out.const_data_ptr(), 16);
    if (vec) {
      swiglu_kernel<scalar_t, VW><<<elementwise_blocks(ceil_div(n_out, VW)), 256, 0, stream>>>(
          h.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n_out, static_cast<A>(alpha),
          static_cast<A>(limit));
    } else {
      swiglu_kernel<scalar_t, 1><<<elementwise_blocks(n_out), 256, 0, stream>>>(
          h.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n_out, static_cast<A>(alpha),
          static_cast<A>(limit));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor swiglu_backward(const at::Tensor& grad_out, const at::Tensor& h_in, double alpha, double limit) {
  check_swiglu_backward(grad_out, h_in, alpha, limit);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous(), dy = grad_out.contiguous();
  at::Tensor dh = at::empty(h.sizes(), h.options());
  const int64_t n_out = dy.numel();
  if (n_out == 0) return dh;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "swiglu_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    constexpr int VW = kVec16<scalar_t>;
    const bool vec = is_aligned(h.const_data_ptr(), 16) && is_aligned(dy.const_data_ptr(), 16) &&
                     is_aligned(dh.const_data_ptr(), 16);
    if (vec) {
      swiglu_bwd_kernel<scalar_t, VW><<<elementwise_blocks(ceil_div(n_out, VW)), 256, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), dh.mutable_data_ptr<scalar_t>(), n_out,
          static_cast<A>(alpha), static_cast<A>(limit));
    } else {
      swiglu_bwd_kernel<scalar_t, 1><<<elementwise_blocks(n_out), 256, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), dh.mutable_data_ptr<scalar_t>(), n_out,
          static_cast<A>(alpha), static_cast<A>(limit));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dh;
}

// ------------------------------------------------------------------------------------ combine

// inv[order[r]] = r for order values in [0, n) (inv is -1 on entry, so a slot no row maps to stays
// -1 and reads as NaN below).
__global__ void __launch_bounds__(256)
    invert_kernel(const int32_t* __restrict__ order, int64_t n, int32_t* __restrict__ inv) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n; r += stride) {
    const int32_t s = order[r];
    if (s >= 0 && s < n) inv[s] = static_cast<int32_t>(r);
  }
}

// out[t, :] = sum_j w[t, j] * y[inv[t*k + j], :], j ascending, in A; one thread per VW-vector of
// out. y [N, d], out [T, d] (16-byte aligned rows when VW > 1, d % VW == 0), w [T, k] in A.
template <typename T, int VW>
__global__ void __launch_bounds__(256)
    combine_kernel(const T* __restrict__ y, const int32_t* __restrict__ inv, const acc_t<T>* __restrict__ w,
                   int64_t n_tokens, int k, int64_t d, T* __restrict__ out) {
  using A = acc_t<T>;
  using V = Vec<T, VW>;
  const int64_t nv = d / VW, total = n_tokens * nv;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t t = i / nv, v = i - t * nv;
    A acc[VW];
#pragma unroll
    for (int e = 0; e < VW; ++e) acc[e] = 0;
    bool bad = false;
    for (int j = 0; j < k; ++j) {
      const int32_t r = inv[t * k + j];
      if (r < 0) {
        bad = true;
        continue;
      }
      const A wj = w[t * k + j];
      const V yv = reinterpret_cast<const V*>(y)[r * nv + v];
#pragma unroll
      for (int e = 0; e < VW; ++e) acc[e] += wj * static_cast<A>(yv.v[e]);
    }
    V o;
#pragma unroll
    for (int e = 0; e < VW; ++e) o.v[e] = bad ? quiet_nan<T>() : static_cast<T>(acc[e]);
    reinterpret_cast<V*>(out)[i] = o;
  }
}

// grad_y[r, :] = w[s] * grad_out[s / k, :] for s = order[r] (NaN for s outside [0, N)).
template <typename T, int VW>
__global__ void __launch_bounds__(256)
    combine_grad_y_kernel(const T* __restrict__ go, const int32_t* __restrict__ order, const acc_t<T>* __restrict__ w,
                          int64_t n, int k, int64_t d, T* __restrict__ gy) {
  using A = acc_t<T>;
  using V = Vec<T, VW>;
  const int64_t nv = d / VW, total = n * nv;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / nv, v = i - r * nv;
    const int32_t s = order[r];
    V o;
    if (s >= 0 && s < n) {
      const A ws = w[s];
      const V g = reinterpret_cast<const V*>(go)[(s / k) * nv + v];
#pragma unroll
      for (int e = 0; e < VW; ++e) o.v[e] = static_cast<T>(ws * static_cast<A>(g.v[e]));
    } else {
#pragma unroll
      for (int e = 0; e < VW; ++e) o.v[e] = quiet_nan<T>();
    }
    reinterpret_cast<V*>(gy)[i] = o;
  }
}

// gw[s] = dot(grad_out[s / k, :], y[inv[s], :]) in A, one warp per slot s (NaN when inv[s] < 0).
template <typename T, int VW>
__global__ void __launch_bounds__(256)
    combine_grad_w_kernel(const T* __restrict__ go, const T* __restrict__ y, const int32_t* __restrict__ inv,
                          int64_t n, int k, int64_t d, acc_t<T>* __restrict__ gw) {
  using A = acc_t<T>;
  using V = Vec<T, VW>;
  const int lane = threadIdx.x & 31;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (s >= n) return;  // whole warp
  const int32_t r = inv[s];
  if (r < 0) {
    if (lane == 0) gw[s] = quiet_nan<A>();
    return;
  }
  const int64_t nv = d / VW;
  const V* g = reinterpret_cast<const V*>(go) + (s / k) * nv;
  const V* yr = reinterpret_cast<const V*>(y) + static_cast<int64_t>(r) * nv;
  A acc = 0;
  for (int64_t v = lane; v < nv; v += 32) {
    const V a = g[v], b = yr[v];
#pragma unroll
    for (int e = 0; e < VW; ++e) acc += static_cast<A>(a.v[e]) * static_cast<A>(b.v[e]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(kFull, acc, off);
  if (lane == 0) gw[s] = acc;
}

// inv [N] int32 of `order` (see invert_kernel).
at::Tensor inverse_order(const at::Tensor& order, cudaStream_t stream) {
  const int64_t n = order.numel();
  at::Tensor inv = at::full({n}, -1, order.options());
  if (n > 0) {
    invert_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(order.const_data_ptr<int32_t>(), n,
                                                            inv.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return inv;
}

at::Tensor moe_combine(const at::Tensor& y_in, const at::Tensor& order_in, const at::Tensor& weights_in) {
  check_moe_combine(y_in, order_in, weights_in);
  TORCH_CHECK(y_in.size(0) < std::numeric_limits<int32_t>::max(), "moe_combine: N must be < 2^31-1, got ", y_in.size(0));
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous(), order = order_in.contiguous();
  const auto acc = acc_dtype(y.scalar_type());
  const at::Tensor w = weights_in.to(acc).contiguous();
  const int64_t T = w.size(0), k = w.size(1), d = y.size(1);
  at::Tensor out = at::empty({T, d}, y.options());
  if (T == 0 || d == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor inv = inverse_order(order, stream);
  launch_combine(y, inv.const_data_ptr<int32_t>(), w, out, stream);
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_combine_backward(const at::Tensor& grad_out, const at::Tensor& y_in,
                                                        const at::Tensor& order_in, const at::Tensor& weights_in) {
  check_moe_combine_backward(grad_out, y_in, order_in, weights_in);
  TORCH_CHECK(y_in.size(0) < std::numeric_limits<int32_t>::max(), "moe_combine_backward: N must be < 2^31-1, got ",
              y_in.size(0));
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous(), order = order_in.contiguous(), go = grad_out.contiguous();
  const auto acc = acc_dtype(y.scalar_type());
  const at::Tensor w = weights_in.to(acc).contiguous();
  const int64_t n = y.size(0), k = w.size(1), d = y.size(1);
  at::Tensor gy = at::empty(y.sizes(), y.options());
  at::Tensor gw = at::empty(w.sizes(), w.options());
  if (n == 0) return {gy, gw.to(weights_in.scalar_type())};
  if (d == 0) return {gy, at::zeros(w.sizes(), weights_in.options())};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor inv = inverse_order(order, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "moe_combine_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    constexpr int VW = kVec16<scalar_t>;
    const bool vec = d % VW == 0 && is_aligned(y.const_data_ptr(), 16) && is_aligned(go.const_data_ptr(), 16) &&
                     is_aligned(gy.const_data_ptr(), 16);
    auto run = [&](auto vw) {
      constexpr int W = decltype(vw)::value;
      combine_grad_y_kernel<scalar_t, W><<<elementwise_blocks(n * (d / W)), 256, 0, stream>>>(
          go.const_data_ptr<scalar_t>(), order.const_data_ptr<int32_t>(), w.const_data_ptr<A>(), n,
          static_cast<int>(k), d, gy.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      combine_grad_w_kernel<scalar_t, W><<<grid_x(ceil_div(n, 8), "moe_combine_backward"), 256, 0, stream>>>(
          go.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), inv.const_data_ptr<int32_t>(), n,
          static_cast<int>(k), d, gw.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) run(std::integral_constant<int, VW>{});
    else run(std::integral_constant<int, 1>{});
  });
  return {gy, gw.to(weights_in.scalar_type())};
}

}  // namespace

void moe_decode_prep(const at::Tensor& logits, int64_t k, at::Tensor& weights, int32_t* order, int32_t* row_token,
                     int32_t* inv, int32_t* so, int32_t* tile_start, cudaStream_t stream) {
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(T * k >= 1 && T * k <= kPrepMaxSlots && E <= kPrepMaxExperts && logits.is_contiguous(),
              "moe_decode_prep: needs 1 <= T k <= ", kPrepMaxSlots, ", E <= ", kPrepMaxExperts,
              " and contiguous logits, got T=", T, ", k=", k, ", E=", E);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moe_decode_prep", [&] {
    moe_decode_prep_kernel<scalar_t><<<1, kRouteWarps * 32, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), static_cast<int>(T), static_cast<int>(E), static_cast<int>(k),
        weights.mutable_data_ptr<acc_t<scalar_t>>(), order, row_token, inv, so, tile_start);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_combine(const at::Tensor& y, const int32_t* inv, const at::Tensor& w, at::Tensor& out,
                    cudaStream_t stream) {
  const int64_t T = w.size(0), k = w.size(1), d = y.size(1);
  if (T == 0 || d == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "moe_combine_cuda", [&] {
    constexpr int VW = kVec16<scalar_t>;
    const bool vec = d % VW == 0 && is_aligned(y.const_data_ptr(), 16) && is_aligned(out.const_data_ptr(), 16);
    auto run = [&](auto vw) {
      constexpr int W = decltype(vw)::value;
      combine_kernel<scalar_t, W><<<elementwise_blocks(T * (d / W)), 256, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), inv, w.const_data_ptr<acc_t<scalar_t>>(), T, static_cast<int>(k), d,
          out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) run(std::integral_constant<int, VW>{});
    else run(std::integral_constant<int, 1>{});
  });
}

TORCH_LIBRARY_IMPL(gptoss_ext, CUDA, m) {
  m.impl("moe_route", &moe_route);
  m.impl("moe_route_backward", &moe_route_backward);
  m.impl("moe_dispatch", &moe_dispatch);
  m.impl("swiglu", &swiglu);
  m.impl("swiglu_backward", &swiglu_backward);
  m.impl("moe_combine", &moe_combine);
  m.impl("moe_combine_backward", &moe_combine_backward);
}

}  // namespace gptoss::cuda
