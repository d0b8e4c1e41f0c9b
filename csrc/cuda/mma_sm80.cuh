#pragma once
// PTX wrappers of the tensor-core kernels (attention and MoE; sm_80+): cp.async staging, ldmatrix,
// mma.sync m16n8k16 (bf16/fp16 -> fp32) and packing two floats into one 32-bit register. The one
// copy of each wrapper. Compiled for an older device the sm_80 instructions trap instead (the host
// code never selects a tensor-core kernel there).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define GPTOSS_NEED_SM80() __trap()
#define GPTOSS_HAS_SM80 0
#else
#define GPTOSS_NEED_SM80() ((void)0)
#define GPTOSS_HAS_SM80 1
#endif

namespace gptoss {
namespace sm80 {

// The 16-bit element types: bfloat16 (__nv_bfloat16 or c10::BFloat16) or half (__half, c10::Half).
template <typename T>
constexpr bool kIsBf16 = std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, c10::BFloat16>;
template <typename T>
constexpr bool kIsHalf = std::is_same_v<T, __half> || std::is_same_v<T, c10::Half>;

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte global->shared copy (dst and src 16-byte aligned); with valid == false the destination
// is zero-filled and nothing is read (src-size 0; src must still be a mapped address).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  GPTOSS_NEED_SM80();
#if GPTOSS_HAS_SM80
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if GPTOSS_HAS_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Wait until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if GPTOSS_HAS_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Four 8x8 b16 matrices from shared memory: lane l gives the row address of matrix l / 8, row
// l % 8; register i of lane (g = l / 4, t = l % 4) receives elements (2t, 2t+1) of row g of matrix
// i (transposed: of column g).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  GPTOSS_NEED_SM80();
#if GPTOSS_HAS_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  GPTOSS_NEED_SM80();
#if GPTOSS_HAS_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// c += a * b with a: 16x16 (row), b: 16x8 (col), c: 16x8 float32; T (bf16 or half) the type of a
// and b. Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with gid = lane / 4 and
// tig = lane % 4; each register holds two consecutive-k elements, the lower k in the low half:
//   a0 = A[gid][2tig..+1], a1 = A[gid+8][2tig..+1], a2 = A[gid][2tig+8..+9], a3 = A[gid+8][2tig+8..+9]
//   b0 = B[2tig..+1][gid],  b1 = B[2tig+8..+9][gid]
//   c0,c1 = C[gid][2tig..+1], c2,c3 = C[gid+8][2tig..+1]
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(kIsBf16<T> || kIsHalf<T>, "mma_16816: bf16 or fp16");
  GPTOSS_NEED_SM80();
#if GPTOSS_HAS_SM80
  if constexpr (kIsBf16<T>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// Two floats -> one 32-bit register of two 16-bit T (round to nearest even), `lo` in the low half
// (the element with the smaller column index, as the mma fragments and memory order both expect).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  static_assert(kIsBf16<T> || kIsHalf<T>, "pack2: bf16 or fp16");
  uint32_t u;
  if constexpr (kIsBf16<T>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&u, &v, 4);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&u, &v, 4);
  }
  return u;
}

}  // namespace sm80
}  // namespace gptoss
