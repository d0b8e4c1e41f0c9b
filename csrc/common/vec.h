#pragma once
// Float vectors over at::vec for the CPU kernels: load any storage dtype as float lanes, store
// float lanes back. Partial (tail) variants take a count n < kVecSize.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace gptoss::cpu {

// True when this CPU has the AVX512-BF16 dot products (vdpbf16ps); asked once. Always false in a
// build without the AVX-512 kernels.
inline bool cpu_has_avx512_bf16() {
#if defined(CPU_CAPABILITY_AVX512)
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kVecSize = fVec::size();

template <typename T>
inline fVec load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else {
    fVec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

template <typename T>
inline fVec load_f(const T* p, int64_t n) {
  if (n >= kVecSize) return load_f(p);
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p, n);
  } else {
    T buf[kVecSize] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
    return load_f(buf);
  }
}

template <typename T>
inline void store_f(T* p, const fVec& v, int64_t n = kVecSize) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, n);
  }
}

// v rounded to T's precision (as storing to T and loading back would give), in registers.
template <typename T>
inline fVec round_f(const fVec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v)));
  }
}

// Apply f(i, n) over [0, len) in vector steps: n == kVecSize for full steps, n < kVecSize once at
// the tail.
template <typename F>
inline void for_vec(int64_t len, F&& f) {
  int64_t i = 0;
  for (; i + kVecSize <= len; i += kVecSize) f(i, kVecSize);
  if (i < len) f(i, len - i);
}

}  // namespace gptoss::cpu
