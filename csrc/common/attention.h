#pragma once
// Attention math shared by the CPU and CUDA kernels (spec §2.2): the visibility rule of the causal
// / sliding-window mask, and the online softmax with a learned sink. Both backends call these
// inline functions (GPTOSS_HD), so the CPU tests exercise the GPU's rules too.
//
// Conventions
// - Positions: query i of a call sits at position q_offset + i; key j at position j (in a KV cache,
//   the position of a token, not its slot). Key k is visible to query q iff
//   k <= q and (window == 0 or k > q - window): a window of W admits W keys including q itself.
// - Online softmax state per query row: m (running max of the logits seen, initialised to the
//   sink logit or -inf) and l (sum of exp(logit - softmax_offset(m)) over the keys seen, WITHOUT
//   the sink term; the sink's exp(sink - offset) is added once, in softmax_finalize). Keeping the
//   sink out of the running sum lets every thread of a row accumulate a partial l and lets split-K
//   partials be merged (softmax_combine) without counting the sink twice. The output accumulator
//   acc = sum_j exp(s_j - offset) v_j is rescaled with l whenever m moves; out = acc * out_scale.
// - Domain: kLog2 = true means every logit, m and lse passed here is in log2 units (logit * log2 e,
//   the GPU kernels' exp2 form); kLog2 = false means natural units (exp / log, the CPU kernels).
//   softmax_finalize returns lse in the same units as its inputs; multiply by ln 2 for natural.
// - Guards: a row whose max is still -inf (no visible key, no sink) uses 0 as its exponent
//   offset, so exp(-inf - offset) = 0 and never exp(-inf + inf) = NaN; its output is 0 and its
//   lse -inf. With a sink and no visible key: output 0, lse = sink. A large sink (+-1e4) only
//   makes the key (or sink) terms underflow to 0: no Inf, no NaN.
#include <math.h>
#include <stdint.h>

#include "common/macros.h"

namespace gptoss {

// --------------------------------------------------------------------------------- the mask

// Key position `key` visible to query position `query` (window 0 = full causal).
template <typename I>
GPTOSS_HD bool attn_visible(I key, I query, I window) {
  return key <= query && (window == 0 || key > query - window);
}

// Smallest key position visible to `query` (>= 0); the largest is `query` itself.
template <typename I>
GPTOSS_HD I attn_first_visible(I query, I window) {
  const I lo = window == 0 ? I(0) : query - window + 1;
  return lo < I(0) ? I(0) : lo;
}

// ------------------------------------------------------------------- exp/log in either domain

GPTOSS_HD float attn_exp(float x, bool log2_domain) { return log2_domain ? exp2f(x) : expf(x); }
GPTOSS_HD double attn_exp(double x, bool log2_domain) { return log2_domain ? exp2(x) : exp(x); }
GPTOSS_HD float attn_log(float x, bool log2_domain) { return log2_domain ? log2f(x) : logf(x); }
GPTOSS_HD double attn_log(double x, bool log2_domain) { return log2_domain ? log2(x) : log(x); }

template <typename F>
GPTOSS_HD F attn_neg_inf() {
  return -static_cast<F>(INFINITY);
}

// ------------------------------------------------------------------ online softmax with a sink

// Initial state of a row: m = sink (or -inf without one), l = 0.
template <typename F>
GPTOSS_HD void softmax_init(bool has_sink, F sink, F& m, F& l) {
  m = has_sink ? sink : attn_neg_inf<F>();
  l = F(0);
}

// Exponent offset for a running max: m itself, or 0 while m is -inf (nothing seen yet).
template <typename F>
GPTOSS_HD F softmax_offset(F m) {
  return m == attn_neg_inf<F>() ? F(0) : m;
}

// A new block of logits with maximum `block_max` (-inf when all are masked) arrives: raise m and
// return the factor alpha by which the old l and output accumulator must be multiplied (exactly 1
// when m does not move). The block's terms are then exp(logit - softmax_offset(m)).
template <bool kLog2, typename F>
GPTOSS_HD F softmax_update_max(F& m, F block_max) {
  const F m_new = block_max > m ? block_max : m;
  // m == -inf: l and the accumulator are 0, alpha is irrelevant but must not be NaN.
  const F alpha = m == attn_neg_inf<F>() ? F(0) : attn_exp(m - m_new, kLog2);
  m = m_new;
  return alpha;
}

// End of a row: add the sink term to l (which holds the keys' sum relative to m) and return the
// factor for the output accumulator (1/l, or 0 for an empty row) and the lse (same units as m).
template <bool kLog2, typename F>
GPTOSS_HD void softmax_finalize(F m, F l, bool has_sink, F sink, F& out_scale, F& lse) {
  if (has_sink) l += attn_exp(sink - softmax_offset(m), kLog2);
  if (l > F(0)) {
    out_scale = F(1) / l;
    lse = m + attn_log(l, kLog2);
  } else {
    out_scale = F(0);
    lse = attn_neg_inf<F>();
  }
}

// Split-K merge: fold one partial (m_s, l_s) computed WITHOUT the sink into a running (M, L).
// Start with softmax_init(has_sink, sink, M, L); after all partials, softmax_finalize(M, L, ...)
// adds the sink term. The returned pair scales: the running accumulator by `scale_run`, the
// partial's accumulator by `scale_part` (accumulate acc = acc * scale_run + acc_s * scale_part).
template <bool kLog2, typename F>
GPTOSS_HD void softmax_combine(F& M, F& L, F m_s, F l_s, F& scale_run, F& scale_part) {
  if (m_s == attn_neg_inf<F>()) {  // empty partial
    scale_run = F(1);
    scale_part = F(0);
    return;
  }
  const F M_new = m_s > M ? m_s : M;
  scale_run = M == attn_neg_inf<F>() ? F(0) : attn_exp(M - M_new, kLog2);
  scale_part = attn_exp(m_s - M_new, kLog2);
  L = L * scale_run + l_s * scale_part;
  M = M_new;
}

// ------------------------------------------------------------------------------- backward

// P = exp(s - attn_bwd_lse(lse)) (natural units). A row without sink and without visible keys has
// lse = -inf; mapping it to +inf makes its P exactly 0 (instead of exp(-inf + inf) = NaN).
template <typename F>
GPTOSS_HD F attn_bwd_lse(F lse) {
  return lse == attn_neg_inf<F>() ? -attn_neg_inf<F>() : lse;
}

// One row's contribution to d(loss)/d(sink) (natural units): -p_sink * Di with
// p_sink = exp(sink - lse) and Di = rowsum(dO * O) (minus the row's grad_lse when the lse output
// has a gradient).
template <typename F>
GPTOSS_HD F attn_sink_grad(F sink, F lse, F Di) {
  return -attn_exp(sink - lse, false) * Di;
}

}  // namespace gptoss
