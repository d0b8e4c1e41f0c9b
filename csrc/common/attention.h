#pragma once
// Attention math shared by the CPU and CUDA kernels (spec §2.2): the visibility rule and the
// online softmax whose first column is the sink (a logit in post-scale units with no value).
//
// One query row's softmax state is (m, l): m the running max over the columns seen so far (it
// starts at the sink), l = sum over those columns of exp(x - m) (the sink contributes
// exp(sink - m)). The output accumulator acc = sum_j exp(s_j - m) v_j is rescaled whenever m
// moves. At the end out = acc / l and lse = m + log(l). A row that saw no column (no visible key
// and no sink) keeps m = -inf, l = 0 and ends with out 0, lse -inf; with a sink it ends with
// out 0, lse = sink. No step ever forms inf - inf, so large sinks (+-1e4) give no Inf or NaN.
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/macros.h"

namespace gptoss {

template <typename F>
GPTOSS_HD F attn_inf() {
  return std::numeric_limits<F>::infinity();
}

// First key position visible to a query at position `pos` (window 0 = full causal); the last is
// `pos` itself. Visible: key j with j <= pos and (window == 0 or j > pos - window).
GPTOSS_HD int64_t attn_key_begin(int64_t pos, int64_t window) {
  return (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;
}

GPTOSS_HD bool attn_visible(int64_t qpos, int64_t kpos, int64_t window) {
  return kpos <= qpos && (window == 0 || kpos > qpos - window);
}

// State before any key: the sink column alone (m = sink, l = 1), or nothing (m = -inf, l = 0).
template <typename F>
GPTOSS_HD void softmax_init(bool has_sink, F sink, F& m, F& l) {
  m = has_sink ? sink : -attn_inf<F>();
  l = has_sink ? F(1) : F(0);
}

// Fold in a tile of logits whose max over the visible ones is tile_max (-inf when none is
// visible). Updates m; alpha is the factor for l and acc (l = l * alpha + sum_j exp(s_j - shift),
// acc = acc * alpha + sum_j exp(s_j - shift) v_j); shift is what to subtract from the tile's
// logits before exp: the new m, or 0 while m is still -inf, so that masked logits (-inf) give
// exp(-inf) = 0 and never exp(NaN).
template <typename F>
GPTOSS_HD void softmax_update(F& m, F tile_max, F& alpha, F& shift) {
  using std::exp;
  const F m_new = tile_max > m ? tile_max : m;
  alpha = m_new == m ? F(1) : exp(m - m_new);  // m = -inf < m_new: exp(-inf) = 0
  shift = m_new == -attn_inf<F>() ? F(0) : m_new;
  m = m_new;
}

// Merge the partial state (m2, l2) of another key range into (m, l) (split-K combine):
// acc = acc * a1 + acc2 * a2.
template <typename F>
GPTOSS_HD void softmax_merge(F& m, F& l, F m2, F l2, F& a1, F& a2) {
  using std::exp;
  const F m_new = m2 > m ? m2 : m;
  a1 = m == m_new ? F(1) : exp(m - m_new);
  a2 = m2 == m_new ? F(1) : exp(m2 - m_new);
  l = l * a1 + l2 * a2;
  m = m_new;
}

// out = acc * inv_l (0 for a row that saw no column); lse = m + log(l) (-inf for such a row).
template <typename F>
GPTOSS_HD void softmax_finalize(F m, F l, F& inv_l, F& lse) {
  using std::log;
  if (l > F(0)) {
    inv_l = F(1) / l;
    lse = m + log(l);
  } else {
    inv_l = F(0);
    lse = -attn_inf<F>();
  }
}

// Backward: P = exp(s - attn_bwd_lse(lse)). A row without sink and without visible keys has
// lse = -inf; mapping it to +inf makes its P exactly 0 (instead of exp(-inf + inf) = NaN).
template <typename F>
GPTOSS_HD F attn_bwd_lse(F lse) {
  return lse == -attn_inf<F>() ? attn_inf<F>() : lse;
}

// One row's contribution to d(loss)/d(sink): -p_sink * Di with p_sink = exp(sink - lse) and
// Di = rowsum(dO * O) (minus the row's grad_lse when the lse output has a gradient).
template <typename F>
GPTOSS_HD F attn_sink_grad(F sink, F lse, F Di) {
  using std::exp;
  return -exp(sink - lse) * Di;
}

}  // namespace gptoss
