// Mixture-of-experts ops on the CPU (spec §2.4): routing, dispatch, SwiGLU, the dense grouped
// expert GEMM (forward and backward) and the weighted combine. The MXFP4 codec and the MXFP4
// grouped GEMM are in mxfp4.cpp. Contracts: registration.cpp.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "common/dispatch.h"
#include "common/moe_math.h"
#include "common/vec.h"
#include "cpu/moe_cpu.h"
#include "ops.h"

namespace gptoss::cpu {

// ------------------------------------------------------------------ SwiGLU rows (shared)

template <typename TIn, typename TOut>
void swiglu_row(const TIn* h, TOut* out, int64_t inter, float alpha, float limit, const float* bias) {
  const fVec valpha(alpha), vlimit(limit), vnlimit(-limit), one(1.f);
  int64_t i = 0;
  for (; i + kVecSize <= inter; i += kVecSize) {
    fVec a = load_f(h + 2 * i), b = load_f(h + 2 * i + kVecSize);
    if (bias) {
      a = a + fVec::loadu(bias + 2 * i);
      b = b + fVec::loadu(bias + 2 * i + kVecSize);
    }
    auto [glu, lin] = at::vec::deinterleave2(a, b);
    // min/max propagate NaN like torch.clamp; the scalar form (moe_math.h) does the same.
    const fVec g = at::vec::minimum(glu, vlimit);
    const fVec l = at::vec::minimum(at::vec::maximum(lin, vnlimit), vlimit);
    const fVec sig = one / (one + (g * valpha).neg().exp());
    store_f(out + i, g * sig * (l + one));
  }
  for (; i < inter; ++i) {
    float glu = static_cast<float>(h[2 * i]), lin = static_cast<float>(h[2 * i + 1]);
    if (bias) {
      glu += bias[2 * i];
      lin += bias[2 * i + 1];
    }
    out[i] = static_cast<TOut>(swiglu_fwd<float>(glu, lin, alpha, limit));
  }
}

template <typename TIn, typename TOut>
void bias_row(const TIn* h, TOut* out, int64_t m, const float* bias) {
  for_vec(m, [&](int64_t i, int64_t n) {
    fVec v = n == kVecSize ? load_f(h + i) : load_f(h + i, n);
    if (bias) v = v + fVec::loadu(bias + i, n);
    store_f(out + i, v, n);
  });
}

template void swiglu_row<float, float>(const float*, float*, int64_t, float, float, const float*);
template void swiglu_row<float, at::BFloat16>(const float*, at::BFloat16*, int64_t, float, float, const float*);
template void swiglu_row<float, at::Half>(const float*, at::Half*, int64_t, float, float, const float*);
template void bias_row<float, float>(const float*, float*, int64_t, const float*);
template void bias_row<float, at::BFloat16>(const float*, at::BFloat16*, int64_t, const float*);
template void bias_row<float, at::Half>(const float*, at::Half*, int64_t, const float*);

float clamp_limit(double limit) {
  return std::isinf(limit) ? INFINITY : static_cast<float>(limit);
}

// --------------------------------------------------------------------------- Grouping

Grouping make_grouping(const at::Tensor& offsets, const c10::optional<at::Tensor>& row_index, int64_t n_rows,
                       int64_t x_rows, const char* op) {
  check_grouping_values(offsets, row_index, n_rows, x_rows, op);
  Grouping g;
  const at::Tensor off = offsets.contiguous();
  g.offsets.assign(off.const_data_ptr<int32_t>(), off.const_data_ptr<int32_t>() + off.numel());
  if (row_index.has_value() && row_index->defined()) g.row_index = row_index->contiguous();
  return g;
}

// -------------------------------------------------------------------------------- Routing

namespace {
// a ranks before b: larger logit first, NaN above every number (a descending torch.sort).
template <typename T>
inline bool ranks_before(T a, T b) {
  return (std::isnan(a) && !std::isnan(b)) || a > b;
}
}  // namespace

template <typename TIn, typename TAcc>
void route_rows(const TIn* logits, TAcc* weights, int32_t* experts, int64_t tokens, int64_t e, int64_t k) {
  at::parallel_for(0, tokens, std::max<int64_t>(1, 8192 / e), [&](int64_t t0, int64_t t1) {
    std::vector<TAcc> val(k);
    std::vector<int32_t> idx(k);
    for (int64_t t = t0; t < t1; ++t) {
      const TIn* row = logits + t * e;
      int64_t filled = 0;
      for (int64_t j = 0; j < e; ++j) {
        const TAcc v = static_cast<TAcc>(row[j]);
        if (filled == k && !ranks_before(v, val[k - 1])) continue;  // ties keep the lower index
        int64_t p = filled < k ? filled++ : k - 1;
        while (p > 0 && ranks_before(v, val[p - 1])) {
          val[p] = val[p - 1];
          idx[p] = idx[p - 1];
          --p;
        }
        val[p] = v;
        idx[p] = static_cast<int32_t>(j);
      }
      // softmax over the k selected (val[0] is the max)
      TAcc sum = 0;
      TAcc* w = weights + t * k;
      for (int64_t j = 0; j < k; ++j) {
        w[j] = std::exp(val[j] - val[0]);
        sum += w[j];
      }
      for (int64_t j = 0; j < k; ++j) {
        w[j] /= sum;
        experts[t * k + j] = idx[j];
      }
    }
  });
}

template void route_rows<float, float>(const float*, float*, int32_t*, int64_t, int64_t, int64_t);
template void route_rows<at::BFloat16, float>(const at::BFloat16*, float*, int32_t*, int64_t, int64_t, int64_t);
template void route_rows<at::Half, float>(const at::Half*, float*, int32_t*, int64_t, int64_t, int64_t);

// ------------------------------------------------------------------- Phased task scheduler

namespace {

// State shared by the threads of one run_phased call.
struct PhasedJob {
  std::vector<int64_t> ends;
  const std::function<void(int64_t)>* body = nullptr;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::exception_ptr error;
};

void wait_done(const std::atomic<int64_t>& done, int64_t target) {
  for (int spins = 0; done.load(std::memory_order_acquire) < target; ++spins) {
    if (spins < 64) {
#if defined(__x86_64__)
      _mm_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

void work_phased(PhasedJob& job) {
  const int64_t n = job.ends.back();
  size_t p = 0;
  for (int64_t t; (t = job.next.fetch_add(1, std::memory_order_relaxed)) < n;) {
    while (t >= job.ends[p]) ++p;
    if (p > 0) wait_done(job.done, job.ends[p - 1]);
    try {
      (*job.body)(t);
    } catch (...) {
      std::lock_guard<std::mutex> lock(job.mu);
      if (!job.error) job.error = std::current_exception();
    }
    job.done.fetch_add(1, std::memory_order_acq_rel);
  }
}

}  // namespace

void run_phased(const std::vector<int64_t>& phase_ends, const std::function<void(int64_t)>& body) {
  if (phase_ends.empty() || phase_ends.back() <= 0) return;
  PhasedJob job;
  job.ends = phase_ends;
  job.body = &body;
  const int64_t n = phase_ends.back();
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) work_phased(job);  // a second call finds no task left
  });  // (every task has finished when the region ends)
  if (job.error) std::rethrow_exception(job.error);
}

namespace {

std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits_in, int64_t k) {
  check_moe_route(logits_in, k);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t t = logits.size(0), e = logits.size(1);
  const auto acc = acc_dtype(logits.scalar_type());
  at::Tensor weights = at::empty({t, k}, logits.options().dtype(acc));
  at::Tensor experts = at::empty({t, k}, logits.options().dtype(at::kInt));
  if (t == 0) return {weights, experts};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moe_route", [&] {
    if (acc == at::kDouble) {
      route_rows<scalar_t, double>(logits.const_data_ptr<scalar_t>(), weights.mutable_data_ptr<double>(),
                                     experts.mutable_data_ptr<int32_t>(), t, e, k);
    } else {
      route_rows<scalar_t, float>(logits.const_data_ptr<scalar_t>(), weights.mutable_data_ptr<float>(),
                                    experts.mutable_data_ptr<int32_t>(), t, e, k);
    }
  });
  return {weights, experts};
}

at::Tensor moe_route_backward(const at::Tensor& grad_weights, const at::Tensor& weights_in,
                              const at::Tensor& experts_in, int64_t num_experts) {
  check_moe_route_backward(grad_weights, weights_in, experts_in, num_experts);
  const at::Tensor w = weights_in.contiguous(), ex = experts_in.contiguous();
  const at::Tensor g = grad_weights.to(w.scalar_type()).contiguous();
  const int64_t t = w.size(0), k = w.size(1);
  at::Tensor out = at::zeros({t, num_experts}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "moe_route_backward", [&] {
    const scalar_t* pw = w.const_data_ptr<scalar_t>();
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    const int32_t* pe = ex.const_data_ptr<int32_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < t * k; ++i)
      TORCH_CHECK(pe[i] >= 0 && pe[i] < num_experts, "moe_route_backward: experts values must be in [0, ",
                  num_experts, "), got ", pe[i]);
    at::parallel_for(0, t, 1024, [&](int64_t t0, int64_t t1) {
      for (int64_t r = t0; r < t1; ++r) {
        scalar_t dot = 0;
        for (int64_t j = 0; j < k; ++j) dot += pw[r * k + j] * pg[r * k + j];
        for (int64_t j = 0; j < k; ++j)
          po[r * num_experts + pe[r * k + j]] += pw[r * k + j] * (pg[r * k + j] - dot);
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------------------- Dispatch

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_dispatch(const at::Tensor& experts_in, int64_t num_experts) {
  check_moe_dispatch(experts_in, num_experts);
  const at::Tensor ex = experts_in.contiguous();
  const int64_t k = ex.size(1), n = ex.numel();
  const auto opts = ex.options().dtype(at::kInt);
  at::Tensor order = at::empty({n}, opts), row_token = at::empty({n}, opts);
  at::Tensor offsets = at::empty({num_experts + 1}, opts);
  const int32_t* pe = ex.const_data_ptr<int32_t>();
  int32_t* po = order.mutable_data_ptr<int32_t>();
  int32_t* pt = row_token.mutable_data_ptr<int32_t>();
  int32_t* poff = offsets.mutable_data_ptr<int32_t>();
  std::vector<int64_t> count(num_experts + 1, 0);
  for (int64_t s = 0; s < n; ++s) {
    TORCH_CHECK(pe[s] >= 0 && pe[s] < num_experts, "moe_dispatch: experts values must be in [0, num_experts) = [0, ",
                num_experts, "), got experts[", s / k, ", ", s % k, "] = ", pe[s]);
    ++count[pe[s] + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) count[e + 1] += count[e];
  for (int64_t e = 0; e <= num_experts; ++e) poff[e] = static_cast<int32_t>(count[e]);
  for (int64_t s = 0; s < n; ++s) {  // stable: slots in ascending order within an expert
    const int64_t pos = count[pe[s]]++;
    po[pos] = static_cast<int32_t>(s);
    pt[pos] = static_cast<int32_t>(s / k);
  }
  return {order, row_token, offsets};
}

// --------------------------------------------------------------------------------- SwiGLU

template <typename T>
void swiglu_bwd_row(const T* dy, const T* h, T* dh, int64_t inter, float alpha, float limit) {
  const fVec valpha(alpha), vlimit(limit), vnlimit(-limit), one(1.f), zero(0.f);
  int64_t i = 0;
  for (; i + kVecSize <= inter; i += kVecSize) {
    auto [glu, lin] = at::vec::deinterleave2(load_f(h + 2 * i), load_f(h + 2 * i + kVecSize));
    const fVec g = at::vec::minimum(glu, vlimit);
    const fVec l = at::vec::minimum(at::vec::maximum(lin, vnlimit), vlimit);
    const fVec sig = one / (one + (g * valpha).neg().exp());
    const fVec swish = g * sig;
    const fVec dswish = sig + valpha * swish * (one - sig);
    const fVec d = load_f(dy + i);
    fVec dglu = at::vec::Vectorized<float>::blendv(d * (l + one) * dswish, zero, glu >= vlimit);
    fVec dlin = at::vec::Vectorized<float>::blendv(d * swish, zero, (lin >= vlimit) | (lin <= vnlimit));
    auto [o0, o1] = at::vec::interleave2(dglu, dlin);
    store_f(dh + 2 * i, o0);
    store_f(dh + 2 * i + kVecSize, o1);
  }
  for (; i < inter; ++i) {
    float dg, dl;
    swiglu_bwd<float>(static_cast<float>(h[2 * i]), static_cast<float>(h[2 * i + 1]), alpha, limit,
                      static_cast<float>(dy[i]), &dg, &dl);
    dh[2 * i] = static_cast<T>(dg);
    dh[2 * i + 1] = static_cast<T>(dl);
  }
}

at::Tensor swiglu(const at::Tensor& h_in, double alpha, double limit) {
  check_swiglu(h_in, alpha, limit);
  const at::Tensor h = h_in.contiguous();
  auto shape = h.sizes().vec();
  const int64_t two_i = shape.back();
  shape.back() = two_i / 2;
  at::Tensor out = at::empty(shape, h.options());
  const int64_t inter = two_i / 2, rows = inter == 0 ? 0 : h.numel() / two_i;
  if (rows == 0) return out;
  if (h.scalar_type() == at::kDouble) {
    const double* ph = h.const_data_ptr<double>();
    double* po = out.mutable_data_ptr<double>();
    at::parallel_for(0, rows * inter, 16384, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) po[i] = swiglu_fwd<double>(ph[2 * i], ph[2 * i + 1], alpha, limit);
    });
    return out;
  }
  const float a = static_cast<float>(alpha), l = clamp_limit(limit);
  GPTOSS_DISPATCH_FLOAT_HALF_BF16(h.scalar_type(), "swiglu", [&] {
    const scalar_t* ph = h.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / inter), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) swiglu_row(ph + r * two_i, po + r * inter, inter, a, l, nullptr);
    });
  });
  return out;
}

at::Tensor swiglu_backward(const at::Tensor& grad_out, const at::Tensor& h_in, double alpha, double limit) {
  check_swiglu_backward(grad_out, h_in, alpha, limit);
  const at::Tensor h = h_in.contiguous(), dy = grad_out.contiguous();
  at::Tensor dh = at::empty_like(h);
  const int64_t two_i = h.size(-1), inter = two_i / 2, rows = inter == 0 ? 0 : h.numel() / two_i;
  if (rows == 0) return dh;
  if (h.scalar_type() == at::kDouble) {
    const double *ph = h.const_data_ptr<double>(), *pd = dy.const_data_ptr<double>();
    double* po = dh.mutable_data_ptr<double>();
    at::parallel_for(0, rows * inter, 16384, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        swiglu_bwd<double>(ph[2 * i], ph[2 * i + 1], alpha, limit, pd[i], po + 2 * i, po + 2 * i + 1);
    });
    return dh;
  }
  const float a = static_cast<float>(alpha), l = clamp_limit(limit);
  GPTOSS_DISPATCH_FLOAT_HALF_BF16(h.scalar_type(), "swiglu_backward", [&] {
    const scalar_t* ph = h.const_data_ptr<scalar_t>();
    const scalar_t* pd = dy.const_data_ptr<scalar_t>();
    scalar_t* po = dh.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / inter), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        swiglu_bwd_row(pd + r * inter, ph + r * two_i, po + r * two_i, inter, a, l);
    });
  });
  return dh;
}

// ------------------------------------------------------------------ Dense grouped GEMM

// The rows of x that expert e reads, [n_e, K] (a view when row_index is None).
at::Tensor expert_rows(const at::Tensor& x, const Grouping& g, int64_t e) {
  const int64_t r0 = g.offsets[e], n = g.offsets[e + 1] - r0;
  if (!g.row_index.defined()) return x.narrow(0, r0, n);
  return at::index_select(x, 0, g.row_index.narrow(0, r0, n));
}

// Weight rows per task of the ATen-GEMM path (float32, float16, float64, or no bf16 brgemm).
constexpr int64_t kMmTile = 256;

}  // namespace

std::vector<TileTask> make_tile_tasks(const std::vector<int64_t>& offsets, int64_t m, int64_t tile,
                                      int64_t min_rows, int64_t max_rows) {
  std::vector<int64_t> experts;
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(offsets.size()); ++e) {
    const int64_t ne = offsets[e + 1] - offsets[e];
    if (ne > 0 && ne >= min_rows && ne <= max_rows) experts.push_back(e);
  }
  std::stable_sort(experts.begin(), experts.end(), [&](int64_t a, int64_t b) {
    return offsets[a + 1] - offsets[a] > offsets[b + 1] - offsets[b];
  });
  std::vector<TileTask> tasks;
  for (int64_t e : experts)
    for (int64_t o0 = 0; o0 < m; o0 += tile) tasks.push_back({e, o0, std::min(tile, m - o0)});
  return tasks;
}

bool vnni_gemm_available() {
  static const bool ok = at::native::cpublas::could_pack(at::kBFloat16);
  return ok;
}

void grouped_gemm_vnni(const at::BFloat16* xg, int64_t k, const std::vector<int64_t>& offsets, int64_t m,
                       const std::vector<TileTask>& tasks, const WeightRows& rows, const float* bias, bool fused,
                       float alpha, float limit, at::BFloat16* out) {
  constexpr int64_t kRowBlock = 32;  // grouped rows per brgemm call (B columns; cached kernels for 1..32)
  const int64_t ldo = fused ? m / 2 : m, k2 = k / 2, n_exp = static_cast<int64_t>(offsets.size()) - 1;
  // B: each expert's grouped rows in blocks of kRowBlock, VNNI: dword (i, j) = bf16 pair (2i, 2i+1)
  // of row j of the block, [k/2][kRowBlock] per block, zero past the expert's last row.
  std::vector<int64_t> first_block(n_exp + 1, 0);
  for (int64_t e = 0; e < n_exp; ++e)
    first_block[e + 1] = first_block[e] + (offsets[e + 1] - offsets[e] + kRowBlock - 1) / kRowBlock;
  std::vector<uint32_t> xv(static_cast<size_t>(first_block[n_exp] * k2 * kRowBlock));
  const uint32_t* x32 = reinterpret_cast<const uint32_t*>(xg);
  at::parallel_for(0, first_block[n_exp], 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t e = std::upper_bound(first_block.begin(), first_block.end(), blk) - first_block.begin() - 1;
      const int64_t r0 = offsets[e] + (blk - first_block[e]) * kRowBlock;
      const int64_t nr = std::min(kRowBlock, offsets[e + 1] - r0);
      uint32_t* dst = xv.data() + blk * k2 * kRowBlock;
      int64_t j0 = 0;
#if defined(CPU_CAPABILITY_AVX512)
      __m512i r[16];
      for (; j0 + 16 <= nr; j0 += 16)
        for (int64_t ib = 0; ib < k2; ib += 16) {  // k2 % 16 == 0 (K % 32 == 0)
          for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_si512(x32 + (r0 + j0 + j) * k2 + ib);
          transpose16x16_u32(r);
          for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + (ib + j) * kRowBlock + j0, r[j]);
        }
#endif
      for (int64_t i = 0; i < k2; ++i)
        for (int64_t j = j0; j < kRowBlock; ++j) dst[i * kRowBlock + j] = j < nr ? x32[(r0 + j) * k2 + i] : 0u;
    }
  });
  struct Scratch {
    std::vector<at::BFloat16> w;
    std::vector<float> acc, h;
    ~Scratch() { at::native::cpublas::brgemm_release(true); }
  };
  run_tasks(
      static_cast<int64_t>(tasks.size()), (offsets.back() - offsets.front()) * m * k,
      [&] {
        Scratch s;
        s.w.resize(kVnniTile * k);
        s.acc.resize(kVnniTile * kRowBlock);
        s.h.resize(kVnniTile);
        return s;
      },
      [&](int64_t ti, Scratch& s) {
        const TileTask& t = tasks[ti];
        const at::BFloat16* w = rows(t.e, t.o0, t.nt, s.w.data());
        const float* b = bias ? bias + t.e * m + t.o0 : nullptr;
        for (int64_t blk = first_block[t.e]; blk < first_block[t.e + 1]; ++blk) {
          const int64_t r0 = offsets[t.e] + (blk - first_block[t.e]) * kRowBlock;
          const int64_t nr = std::min(kRowBlock, offsets[t.e + 1] - r0);
          // acc [nt][kRowBlock]: acc[o][j] = weight row t.o0 + o . grouped row r0 + j
          at::native::cpublas::brgemm(t.nt, nr, k, k, kRowBlock, kRowBlock, false, w,
                                      reinterpret_cast<const at::BFloat16*>(xv.data() + blk * k2 * kRowBlock),
                                      s.acc.data(), true);
          for (int64_t j = 0; j < nr; ++j) {
            for (int64_t o = 0; o < t.nt; ++o) s.h[o] = s.acc[o * kRowBlock + j];
            if (fused)
              swiglu_row(s.h.data(), out + (r0 + j) * ldo + t.o0 / 2, t.nt / 2, alpha, limit, b);
            else
              bias_row(s.h.data(), out + (r0 + j) * ldo + t.o0, t.nt, b);
          }
        }
      });
}

namespace {

// One row of the ATen-GEMM path's epilogue: h [nt] (weight rows o0..o0+nt of one grouped row) plus
// bias -> out_row[o0/2 ...] (fused SwiGLU) or out_row[o0 ...].
template <typename T>
void epilogue_row(const float* h, T* out_row, int64_t o0, int64_t nt, const float* b, bool fused, double alpha,
                  double limit) {
  if (fused)
    swiglu_row(h, out_row + o0 / 2, nt / 2, static_cast<float>(alpha), clamp_limit(limit), b);
  else
    bias_row(h, out_row + o0, nt, b);
}

void epilogue_row(const double* h, double* out_row, int64_t o0, int64_t nt, const double* b, bool fused,
                  double alpha, double limit) {
  if (fused) {
    for (int64_t i = 0; i < nt / 2; ++i)
      out_row[o0 / 2 + i] =
          swiglu_fwd<double>(h[2 * i] + (b ? b[2 * i] : 0.0), h[2 * i + 1] + (b ? b[2 * i + 1] : 0.0), alpha, limit);
  } else {
    for (int64_t i = 0; i < nt; ++i) out_row[o0 + i] = h[i] + (b ? b[i] : 0.0);
  }
}

at::Tensor moe_grouped_gemm(const at::Tensor& x_in, const c10::optional<at::Tensor>& row_index,
                            const at::Tensor& offsets, const at::Tensor& weight_in,
                            const c10::optional<at::Tensor>& bias_in, bool fused_swiglu, double alpha,
                            double limit) {
  const int64_t n = check_moe_grouped_gemm(x_in, row_index, offsets, weight_in, bias_in, fused_swiglu, alpha, limit);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const Grouping g = make_grouping(offsets, row_index, n, x.size(0), "moe_grouped_gemm");
  const int64_t m = weight.size(1), kdim = weight.size(2), mo = fused_swiglu ? m / 2 : m;
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor bias = has_bias ? bias_in->to(acc).contiguous() : at::Tensor();
  at::Tensor out = at::empty({n, mo}, x.options());
  if (n == 0 || mo == 0) return out;
  // grouped input rows, contiguous [N, K]
  const at::Tensor xg = g.row_index.defined() ? at::index_select(x, 0, g.row_index) : x;
  const float a = static_cast<float>(alpha), l = clamp_limit(limit);

  if (x.scalar_type() == at::kBFloat16 && kdim % 32 == 0 && kdim > 0 && vnni_gemm_available()) {
    const at::BFloat16* pw = weight.const_data_ptr<at::BFloat16>();
    grouped_gemm_vnni(
        xg.const_data_ptr<at::BFloat16>(), kdim, g.offsets, m, make_tile_tasks(g.offsets, m, kVnniTile),
        [&](int64_t e, int64_t o0, int64_t, at::BFloat16*) { return pw + (e * m + o0) * kdim; },
        has_bias ? bias.const_data_ptr<float>() : nullptr, fused_swiglu, a, l, out.mutable_data_ptr<at::BFloat16>());
    return out;
  }

  // ATen GEMM per (expert, weight-row tile) in float32 (float64 for float64), single-threaded
  // inside one parallel region; the epilogue reads the float accumulators and rounds once.
  const at::Tensor xa = xg.to(acc);
  const std::vector<TileTask> tasks = make_tile_tasks(g.offsets, m, kMmTile);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_grouped_gemm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* pb = has_bias ? bias.const_data_ptr<acc_t>() : nullptr;
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    run_tasks(
        static_cast<int64_t>(tasks.size()), n * m * kdim, [] { return 0; },
        [&](int64_t ti, int) {
          const TileTask& t = tasks[ti];
          const int64_t r0 = g.offsets[t.e], ne = g.offsets[t.e + 1] - r0;
          const at::Tensor h =
              at::mm(xa.narrow(0, r0, ne), weight[t.e].narrow(0, t.o0, t.nt).to(acc).t()).contiguous();
          const acc_t* ph = h.const_data_ptr<acc_t>();
          const acc_t* b = pb ? pb + t.e * m + t.o0 : nullptr;
          for (int64_t r = 0; r < ne; ++r)
            epilogue_row(ph + r * t.nt, po + (r0 + r) * mo, t.o0, t.nt, b, fused_swiglu, alpha, limit);
        });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_grouped_gemm_backward(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const c10::optional<at::Tensor>& row_index,
    const at::Tensor& offsets, const at::Tensor& weight_in, std::array<bool, 3> output_mask) {
  check_moe_grouped_gemm_backward(grad_out_in, x_in, row_index, offsets, weight_in);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), dy = grad_out_in.contiguous();
  const int64_t n = dy.size(0);
  const Grouping g = make_grouping(offsets, row_index, n, x.size(0), "moe_grouped_gemm_backward");
  const int64_t e_count = weight.size(0), m = weight.size(1);
  const auto acc = acc_dtype(x.scalar_type());
  const bool gathered = g.row_index.defined();
  at::Tensor gx, gw, gb;
  at::Tensor gx_acc;  // float accumulator when several grouped rows add into one x row
  if (output_mask[0]) {
    if (gathered)
      gx_acc = at::zeros(x.sizes(), x.options().dtype(acc));
    else
      gx = at::empty(x.sizes(), x.options());
  }
  if (output_mask[1]) gw = at::zeros(weight.sizes(), weight.options());
  if (output_mask[2]) gb = at::zeros({e_count, m}, x.options());
  for (int64_t e = 0; e < e_count; ++e) {
    const int64_t r0 = g.offsets[e], ne = g.offsets[e + 1] - r0;
    if (ne == 0) continue;
    const at::Tensor dye = dy.narrow(0, r0, ne);
    if (output_mask[0]) {
      if (gathered) {
        const at::Tensor gxe = at::mm(dye, weight[e]);
        gx_acc.index_add_(0, g.row_index.narrow(0, r0, ne), gxe.to(acc));
      } else {
        at::Tensor dst = gx.narrow(0, r0, ne);
        at::mm_out(dst, dye, weight[e]);
      }
    }
    if (output_mask[1]) {
      at::Tensor dst = gw[e];
      at::mm_out(dst, dye.t(), expert_rows(x, g, e));
    }
    if (output_mask[2]) gb[e].copy_(dye.to(acc).sum(0));
  }
  if (output_mask[0] && gathered) gx = gx_acc.to(x.scalar_type());
  auto none = [&] { return at::empty({0}, x.options()); };
  return {output_mask[0] ? gx : none(), output_mask[1] ? gw : none(), output_mask[2] ? gb : none()};
}

// -------------------------------------------------------------------------------- Combine

// slot -> grouped row, checking that order is a permutation of [0, N).
std::vector<int32_t> invert_order(const at::Tensor& order_in, const char* op) {
  const at::Tensor order = order_in.contiguous();
  const int64_t n = order.numel();
  const int32_t* po = order.const_data_ptr<int32_t>();
  std::vector<int32_t> row_of(n, -1);
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(po[r] >= 0 && po[r] < n, op, ": order values must be in [0, N) = [0, ", n, "), got order[", r,
                "] = ", po[r]);
    TORCH_CHECK(row_of[po[r]] < 0, op, ": order must be a permutation (from moe_dispatch); slot ", po[r],
                " appears twice");
    row_of[po[r]] = static_cast<int32_t>(r);
  }
  return row_of;
}

at::Tensor moe_combine(const at::Tensor& y_in, const at::Tensor& order, const at::Tensor& weights_in) {
  check_moe_combine(y_in, order, weights_in);
  const at::Tensor y = y_in.contiguous();
  const auto acc = acc_dtype(y.scalar_type());
  const at::Tensor w = weights_in.to(acc).contiguous();
  const int64_t t = w.size(0), k = w.size(1), d = y.size(1);
  at::Tensor out = at::empty({t, d}, y.options());
  const std::vector<int32_t> row_of = invert_order(order, "moe_combine");
  if (t == 0 || d == 0) return out;
  if (y.scalar_type() == at::kDouble) {
    const double *py = y.const_data_ptr<double>(), *pw = w.const_data_ptr<double>();
    double* po = out.mutable_data_ptr<double>();
    at::parallel_for(0, t, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, d * k)), [&](int64_t t0, int64_t t1) {
      for (int64_t i = t0; i < t1; ++i)
        for (int64_t c = 0; c < d; ++c) {
          double s = 0;
          for (int64_t j = 0; j < k; ++j) s += pw[i * k + j] * py[row_of[i * k + j] * d + c];
          po[i * d + c] = s;
        }
    });
    return out;
  }
  GPTOSS_DISPATCH_FLOAT_HALF_BF16(y.scalar_type(), "moe_combine", [&] {
    const scalar_t* py = y.const_data_ptr<scalar_t>();
    const float* pw = w.const_data_ptr<float>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, t, std::max<int64_t>(1, 262144 / (d * k)), [&](int64_t t0, int64_t t1) {
      for (int64_t i = t0; i < t1; ++i) {
        for_vec(d, [&](int64_t c, int64_t nv) {
          fVec s(0.f);
          for (int64_t j = 0; j < k; ++j) {
            const scalar_t* yr = py + static_cast<int64_t>(row_of[i * k + j]) * d + c;
            s = at::vec::fmadd(fVec(pw[i * k + j]), nv == kVecSize ? load_f(yr) : load_f(yr, nv), s);
          }
          store_f(po + i * d + c, s, nv);
        });
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_combine_backward(const at::Tensor& grad_out, const at::Tensor& y_in,
                                                        const at::Tensor& order, const at::Tensor& weights_in) {
  check_moe_combine_backward(grad_out, y_in, order, weights_in);
  const at::Tensor y = y_in.contiguous(), dy = grad_out.contiguous();
  const auto acc = acc_dtype(y.scalar_type());
  const at::Tensor w = weights_in.to(acc).contiguous();
  const int64_t t = w.size(0), k = w.size(1), d = y.size(1);
  at::Tensor gy = at::empty_like(y);
  at::Tensor gw = at::empty({t, k}, w.options());
  const std::vector<int32_t> row_of = invert_order(order, "moe_combine_backward");
  if (y.scalar_type() == at::kDouble) {
    const double *py = y.const_data_ptr<double>(), *pw = w.const_data_ptr<double>(),
                 *pd = dy.const_data_ptr<double>();
    double *pgy = gy.mutable_data_ptr<double>(), *pgw = gw.mutable_data_ptr<double>();
    at::parallel_for(0, t, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, d * k)), [&](int64_t t0, int64_t t1) {
      for (int64_t i = t0; i < t1; ++i)
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = row_of[i * k + j];
          double s = 0;
          for (int64_t c = 0; c < d; ++c) {
            s += pd[i * d + c] * py[r * d + c];
            pgy[r * d + c] = pw[i * k + j] * pd[i * d + c];
          }
          pgw[i * k + j] = s;
        }
    });
  } else {
    GPTOSS_DISPATCH_FLOAT_HALF_BF16(y.scalar_type(), "moe_combine_backward", [&] {
      const scalar_t* py = y.const_data_ptr<scalar_t>();
      const scalar_t* pd = dy.const_data_ptr<scalar_t>();
      const float* pw = w.const_data_ptr<float>();
      scalar_t* pgy = gy.mutable_data_ptr<scalar_t>();
      float* pgw = gw.mutable_data_ptr<float>();
      at::parallel_for(0, t, std::max<int64_t>(1, 262144 / std::max<int64_t>(d * k, 1)), [&](int64_t t0, int64_t t1) {
        for (int64_t i = t0; i < t1; ++i)
          for (int64_t j = 0; j < k; ++j) {
            const int64_t r = row_of[i * k + j];
            const fVec wv(pw[i * k + j]);
            fVec s(0.f);
            for_vec(d, [&](int64_t c, int64_t nv) {
              const bool full = nv == kVecSize;
              const fVec g = full ? load_f(pd + i * d + c) : load_f(pd + i * d + c, nv);
              const fVec yv = full ? load_f(py + r * d + c) : load_f(py + r * d + c, nv);
              s = at::vec::fmadd(g, yv, s);  // tail lanes load as 0
              store_f(pgy + r * d + c, wv * g, nv);
            });
            pgw[i * k + j] = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, s);
          }
      });
    });
  }
  return {gy, gw.to(weights_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(gptoss_ext, CPU, m) {
  m.impl("moe_route", &moe_route);
  m.impl("moe_route_backward", &moe_route_backward);
  m.impl("moe_dispatch", &moe_dispatch);
  m.impl("swiglu", &swiglu);
  m.impl("swiglu_backward", &swiglu_backward);
  m.impl("moe_grouped_gemm", &moe_grouped_gemm);
  m.impl("moe_grouped_gemm_backward", &moe_grouped_gemm_backward);
  m.impl("moe_combine", &moe_combine);
  m.impl("moe_combine_backward", &moe_combine_backward);
}

}  // namespace gptoss::cpu
