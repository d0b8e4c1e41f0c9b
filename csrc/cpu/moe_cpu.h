#pragma once
// Helpers shared by the CPU MoE translation units (moe.cpp, mxfp4.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <climits>
#include <functional>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace gptoss::cpu {

// Host copy of a validated grouping: offsets [E+1] and row_index [N] (undefined: identity).
struct Grouping {
  std::vector<int64_t> offsets;
  at::Tensor row_index;  // contiguous int32, or undefined
  int64_t src_row(int64_t r) const { return row_index.defined() ? row_index.const_data_ptr<int32_t>()[r] : r; }
};

// Checks the grouping values (check_grouping_values) and copies offsets to the host.
Grouping make_grouping(const at::Tensor& offsets, const c10::optional<at::Tensor>& row_index, int64_t n_rows,
                       int64_t x_rows, const char* op);

// One output row of the clamped SwiGLU: h [2*inter] interleaved (glu even, lin odd), plus bias
// [2*inter] float when non-null -> out [inter]; float math, one rounding.
template <typename TIn, typename TOut>
void swiglu_row(const TIn* h, TOut* out, int64_t inter, float alpha, float limit, const float* bias);

// out[i] = h[i] + bias[i] (bias may be null) for i < m, float math, one rounding.
template <typename TIn, typename TOut>
void bias_row(const TIn* h, TOut* out, int64_t m, const float* bias);

// limit as float (+inf stays +inf).
float clamp_limit(double limit);

// (expert, weight rows [o0, o0 + nt)) work items of a grouped GEMM over the experts with
// min_rows..max_rows grouped rows, weight rows in tiles of `tile`, experts with the most rows first
// (so that dynamic scheduling balances the threads).
struct TileTask {
  int64_t e, o0, nt;
};
std::vector<TileTask> make_tile_tasks(const std::vector<int64_t>& offsets, int64_t m, int64_t tile,
                                      int64_t min_rows = 1, int64_t max_rows = INT64_MAX);

// Runs body(task, state) for task in [0, n) on all threads with dynamic scheduling, inside one
// parallel region; state = make_state() is per-thread scratch, made before the thread's first task.
// `work` (multiply-adds, roughly) below ~1M runs on the calling thread: waking a thread team costs
// more than that.
template <typename MakeState, typename Body>
void run_tasks(int64_t n, int64_t work, const MakeState& make_state, const Body& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t nthr = work < (int64_t{1} << 20) ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, nthr, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < n;) body(t, state);
  });
}

// Runs body(task) for tasks [0, phase_ends.back()) in one parallel region of ATen's intra-op
// threads, claimed dynamically in order. A task of phase p (phase_ends[p-1] <= task < phase_ends[p])
// starts only after every task of the earlier phases has finished, so one call can hold several
// dependent steps (one region instead of one per step). Returns when every task is done and
// rethrows the first exception a task threw. (The same threads as every other op's parallel_for: an
// earlier version ran helpers from the inter-op pool, which on a 2-core machine competed with the
// OpenMP workers still spinning after the previous op's region; the gpt-oss-20b decode's MoE then
// ran no faster on 2 threads than on 1.) body must not open parallel regions.
void run_phased(const std::vector<int64_t>& phase_ends, const std::function<void(int64_t)>& body);

// Top-k then softmax over the k (moe_route's contract) for rows [0, tokens) of logits [tokens, e].
template <typename TIn, typename TAcc>
void route_rows(const TIn* logits, TAcc* weights, int32_t* experts, int64_t tokens, int64_t e, int64_t k);

// ---- bf16 grouped GEMM on ATen's brgemm micro-kernel (oneDNN ukernel; AMX where present).
// Available when this CPU and torch build can run bf16 brgemm on VNNI-packed B.
bool vnni_gemm_available();
// Weight-row tile width of the VNNI path.
constexpr int64_t kVnniTile = 64;
// Weight rows [o0, o0 + nt) of expert e as bf16 rows of length K (row-major, stride K): a pointer
// into the weight itself (dense bf16) or into `scratch` ([kVnniTile][K], decoded MXFP4).
using WeightRows = std::function<const at::BFloat16*(int64_t e, int64_t o0, int64_t nt, at::BFloat16* scratch)>;
// out[r] = act(W_e xg[r] + b_e) for grouped rows r of each expert: xg [N, K] bf16 (rows already
// gathered), fp32 accumulation, bias [E, M] float or null, act = SwiGLU (fused, out [N, M/2]) or
// identity (out [N, M]); one rounding to bf16. K % 32 == 0. brgemm computes each tile transposed:
// A = the weight rows (row-major as stored, no packing), B = the expert's rows, packed once per
// call into VNNI blocks of 32 rows.
// Runs `tasks` (tiles of at most kVnniTile weight rows, from make_tile_tasks).
void grouped_gemm_vnni(const at::BFloat16* xg, int64_t k, const std::vector<int64_t>& offsets, int64_t m,
                       const std::vector<TileTask>& tasks, const WeightRows& rows, const float* bias, bool fused,
                       float alpha, float limit, at::BFloat16* out);

#if defined(CPU_CAPABILITY_AVX512)
// Transposes a 16x16 block of 32-bit words held in 16 registers: r[i] lane j -> r[j] lane i.
inline void transpose16x16_u32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // 128-bit lanes: gather lane l of rows 4q..4q+3 into row 4l + c
    const __m512i a = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);
    const __m512i b = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);
    const __m512i cc = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    const __m512i d = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
    t[c] = _mm512_shuffle_i32x4(a, cc, 0x88);
    t[c + 8] = _mm512_shuffle_i32x4(a, cc, 0xdd);
    t[c + 4] = _mm512_shuffle_i32x4(b, d, 0x88);
    t[c + 12] = _mm512_shuffle_i32x4(b, d, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

}  // namespace gptoss::cpu
