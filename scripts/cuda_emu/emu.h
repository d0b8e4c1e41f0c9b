#pragma once
// Host emulation of the CUDA features the attention kernels use: one CTA at a time, each CUDA
// thread a ucontext fiber on one OS thread, warp collectives (shfl, ldmatrix, mma.sync) through
// per-warp exchange slots and barriers, cp.async as queued copies performed at wait_group (lazy)
// or at issue (eager), shared memory filled with NaN bytes before each CTA, bounds/alignment
// asserts on every shared-memory address.
#include <immintrin.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

using std::max;
using std::min;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct __nv_bfloat16 { uint16_t x; };
struct __half { uint16_t x; };
struct float2 { float x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
struct alignas(16) uint4 { uint32_t x, y, z, w; };
typedef void* cudaStream_t;
typedef int cudaError_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define C10_CUDA_CHECK(x) do { (void)(x); } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() do { } while (0)

namespace emu {

[[noreturn]] inline void fail(const std::string& m) {
  fprintf(stderr, "EMU FAILURE: %s\n", m.c_str());
  fflush(stderr);
  abort();
}
#define EMU_ASSERT(c, m) do { if (!(c)) ::emu::fail(std::string(m) + " at " + __FILE__ + ":" + std::to_string(__LINE__)); } while (0)

constexpr size_t kSmemMax = 232448;  // sm_90 opt-in maximum per block (227 KB)
alignas(128) inline unsigned char g_smem[kSmemMax + 4096];
inline size_t g_dyn_smem = 0;         // this launch's dynamic shared memory
inline int g_max_dyn_attr = 48 * 1024;  // cudaFuncSetAttribute value (per process, simplified)
inline unsigned char* smem_raw() { return g_smem; }

struct Copy {
  uint32_t dst;
  const void* src;
  bool valid;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 tid;
  int linear = 0;
  bool done = false;
  std::function<void()> fn;
  std::vector<std::vector<Copy>> groups;
  std::vector<Copy> open;
};

inline Fiber* g_cur = nullptr;
inline ucontext_t g_sched;
inline dim3 g_blockIdx, g_gridDim, g_blockDim;
inline bool g_eager = false;
inline std::mt19937 g_rng(12345);

inline void yield() { swapcontext(&g_cur->ctx, &g_sched); }

struct Barrier {
  int count = 0, arrived = 0;
  long gen = 0;
  void wait() {
    const long g = gen;
    if (++arrived == count) {
      arrived = 0;
      ++gen;
      yield();  // let others run (scheduling variety)
    } else {
      while (gen == g) yield();
    }
  }
};

inline Barrier g_cta_bar;
inline Barrier g_warp_bar[32];
inline uint64_t g_slot[32][32][6];  // [warp][lane][payload]

inline int lane() { return g_cur->linear & 31; }
inline int warp() { return g_cur->linear >> 5; }

inline void trampoline() {
  g_cur->fn();
  g_cur->done = true;
  swapcontext(&g_cur->ctx, &g_sched);
}

inline void perform(const Copy& c) {
  EMU_ASSERT(c.dst % 16 == 0, "cp.async dst not 16-byte aligned");
  EMU_ASSERT(c.dst + 16 <= g_dyn_smem, "cp.async dst beyond dynamic smem");
  if (c.valid) {
    EMU_ASSERT(reinterpret_cast<uintptr_t>(c.src) % 16 == 0, "cp.async src not 16-byte aligned");
    memcpy(g_smem + c.dst, c.src, 16);
  } else {
    memset(g_smem + c.dst, 0, 16);
  }
}

template <typename K, typename... Args>
void launch(K kernel, dim3 grid, dim3 block, size_t smem, Args... args) {
  EMU_ASSERT(smem <= kSmemMax, "dynamic smem above the sm_90 maximum");
  EMU_ASSERT(smem <= 48 * 1024 || static_cast<int>(smem) <= g_max_dyn_attr,
             "dynamic smem > 48 KB without cudaFuncSetAttribute");
  EMU_ASSERT(grid.y <= 65535 && grid.z <= 65535, "grid.y/z > 65535");
  EMU_ASSERT(block.x * block.y * block.z <= 1024, "block too large");
  const char* ev = getenv("EMU_EAGER");
  g_eager = ev && ev[0] == '1';
  g_dyn_smem = smem;
  g_gridDim = grid;
  g_blockDim = block;
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  std::vector<Fiber> fibers(nthreads);
  for (auto& f : fibers) f.stack.resize(256 * 1024);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        g_blockIdx = dim3(bx, by, bz);
        memset(g_smem, 0xFF, sizeof(g_smem));  // NaN bytes: reading unwritten smem poisons results
        g_cta_bar = Barrier{};
        g_cta_bar.count = nthreads;
        for (int w = 0; w < 32; ++w) {
          g_warp_bar[w] = Barrier{};
          g_warp_bar[w].count = 32;
        }
        for (int t = 0; t < nthreads; ++t) {
          Fiber& f = fibers[t];
          f.linear = t;
          f.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          f.done = false;
          f.groups.clear();
          f.open.clear();
          f.fn = [=]() { kernel(args...); };
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, trampoline, 0);
        }
        int alive = nthreads;
        while (alive > 0) {
          // random order of the runnable fibers each sweep
          std::vector<int> order(nthreads);
          for (int t = 0; t < nthreads; ++t) order[t] = t;
          std::shuffle(order.begin(), order.end(), g_rng);
          for (int t : order) {
            if (fibers[t].done) continue;
            g_cur = &fibers[t];
            swapcontext(&g_sched, &fibers[t].ctx);
            if (fibers[t].done) --alive;
          }
        }
        g_cur = nullptr;
        for (size_t i = kSmemMax; i < sizeof(g_smem); ++i)
          EMU_ASSERT(g_smem[i] == 0xFF, "write beyond the shared-memory arena");
      }
}

}  // namespace emu

#define threadIdx (::emu::g_cur->tid)
#define blockIdx (::emu::g_blockIdx)
#define gridDim (::emu::g_gridDim)
#define blockDim (::emu::g_blockDim)

inline void __syncthreads() { ::emu::g_cta_bar.wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::emu::g_warp_bar[::emu::warp()].wait(); }

template <typename V>
V emu_exchange(V v, int src_lane) {
  static_assert(sizeof(V) <= 8, "payload");
  const int w = ::emu::warp(), l = ::emu::lane();
  memcpy(&::emu::g_slot[w][l][0], &v, sizeof(V));
  ::emu::g_warp_bar[w].wait();
  V r;
  memcpy(&r, &::emu::g_slot[w][src_lane][0], sizeof(V));
  ::emu::g_warp_bar[w].wait();
  return r;
}
template <typename V>
V __shfl_xor_sync(unsigned, V v, int o) { return emu_exchange(v, ::emu::lane() ^ o); }
template <typename V>
V __shfl_sync(unsigned, V v, int src) { return emu_exchange(v, src & 31); }

template <typename T>
T emu_bits_to(uint32_t b);

// ----------------------------------------------------------------------- PTX wrapper stand-ins

inline uint32_t smem_u32(const void* ptr) {
  const auto off = reinterpret_cast<const unsigned char*>(ptr) - ::emu::g_smem;
  EMU_ASSERT(off >= 0 && static_cast<size_t>(off) < ::emu::g_dyn_smem, "smem_u32 of a non-smem pointer");
  return static_cast<uint32_t>(off);
}
inline void cp_async_16(uint32_t dst, const void* src, bool valid) {
  ::emu::Copy c{dst, src, valid};
  if (::emu::g_eager) ::emu::perform(c);
  else ::emu::g_cur->open.push_back(c);
}
inline void cp_async_commit() {
  ::emu::g_cur->groups.push_back(::emu::g_cur->open);
  ::emu::g_cur->open.clear();
}
template <int N>
inline void cp_async_wait() {
  auto& gs = ::emu::g_cur->groups;
  while (static_cast<int>(gs.size()) > N) {
    for (const auto& c : gs.front()) ::emu::perform(c);
    gs.erase(gs.begin());
  }
}

inline uint16_t emu_smem_u16(uint32_t byte_addr) {
  EMU_ASSERT(byte_addr + 2 <= ::emu::g_dyn_smem, "ldmatrix read beyond dynamic smem");
  uint16_t v;
  memcpy(&v, ::emu::g_smem + byte_addr, 2);
  return v;
}

// ldmatrix .x4: lanes 8j..8j+7 give the row addresses of matrix j; lane l receives in r[j] the
// elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix j (transposed: (rows 2(l%4), 2(l%4)+1, col l/4)).
inline void emu_ldmatrix(uint32_t (&r)[4], uint32_t addr, bool trans) {
  EMU_ASSERT(addr % 16 == 0, "ldmatrix row address not 16-byte aligned");
  EMU_ASSERT(addr + 16 <= ::emu::g_dyn_smem, "ldmatrix row beyond dynamic smem");
  const int w = ::emu::warp(), l = ::emu::lane();
  ::emu::g_slot[w][l][0] = addr;
  ::emu::g_warp_bar[w].wait();
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    if (!trans) {
      const uint32_t row = static_cast<uint32_t>(::emu::g_slot[w][8 * j + l / 4][0]);
      lo = emu_smem_u16(row + 2 * (2 * (l % 4)));
      hi = emu_smem_u16(row + 2 * (2 * (l % 4) + 1));
    } else {
      const uint32_t row0 = static_cast<uint32_t>(::emu::g_slot[w][8 * j + 2 * (l % 4)][0]);
      const uint32_t row1 = static_cast<uint32_t>(::emu::g_slot[w][8 * j + 2 * (l % 4) + 1][0]);
      lo = emu_smem_u16(row0 + 2 * (l / 4));
      hi = emu_smem_u16(row1 + 2 * (l / 4));
    }
    r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  ::emu::g_warp_bar[w].wait();
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { emu_ldmatrix(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { emu_ldmatrix(r, addr, true); }

inline float emu_bf16_to_f(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline float emu_half_to_f(uint16_t h) { return _cvtsh_ss(h); }
inline uint16_t emu_f_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fff + ((u >> 16) & 1);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}
inline uint16_t emu_f_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

template <typename T>
inline float emu_to_f(uint16_t b) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return emu_bf16_to_f(b);
  else return emu_half_to_f(b);
}

template <typename T>
inline uint32_t pack2(float lo, float hi) {
  uint16_t a, b;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    a = emu_f_to_bf16(lo);
    b = emu_f_to_bf16(hi);
  } else {
    a = emu_f_to_half(lo);
    b = emu_f_to_half(hi);
  }
  return static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
}

template <typename T>
inline void unpack2(uint32_t u, float& lo, float& hi) {
  lo = emu_to_f<T>(static_cast<uint16_t>(u & 0xffff));
  hi = emu_to_f<T>(static_cast<uint16_t>(u >> 16));
}

// mma.sync m16n8k16 row.col f32 += 16-bit x 16-bit (fragment layouts of the PTX ISA).
template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int w = ::emu::warp(), l = ::emu::lane();
  for (int i = 0; i < 4; ++i) ::emu::g_slot[w][l][i] = a[i];
  ::emu::g_slot[w][l][4] = b0;
  ::emu::g_slot[w][l][5] = b1;
  ::emu::g_warp_bar[w].wait();
  float A[16][16], B[16][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L / 4, t = L % 4;
    auto lo = [&](int i) { return emu_to_f<T>(static_cast<uint16_t>(::emu::g_slot[w][L][i] & 0xffff)); };
    auto hi = [&](int i) { return emu_to_f<T>(static_cast<uint16_t>(::emu::g_slot[w][L][i] >> 16)); };
    A[g][2 * t] = lo(0), A[g][2 * t + 1] = hi(0);
    A[g + 8][2 * t] = lo(1), A[g + 8][2 * t + 1] = hi(1);
    A[g][2 * t + 8] = lo(2), A[g][2 * t + 9] = hi(2);
    A[g + 8][2 * t + 8] = lo(3), A[g + 8][2 * t + 9] = hi(3);
    B[2 * t][g] = lo(4), B[2 * t + 1][g] = hi(4);
    B[2 * t + 8][g] = lo(5), B[2 * t + 9][g] = hi(5);
  }
  const int g = l / 4, t = l % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
    double s = 0;
    for (int k = 0; k < 16; ++k) s += static_cast<double>(A[row][k]) * B[k][col];
    c[e] += static_cast<float>(s);
  }
  ::emu::g_warp_bar[w].wait();
}

template <typename F>
int cudaFuncSetAttribute(F, cudaFuncAttribute, int v) {
  ::emu::g_max_dyn_attr = std::max(::emu::g_max_dyn_attr, v);
  return 0;
}
template <typename F>
int cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F, int, size_t) {
  const char* e = getenv("EMU_OCCUPANCY");
  *n = e ? atoi(e) : 2;
  return 0;
}
inline int cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  const char* e = getenv("EMU_SMS");
  *v = e ? atoi(e) : 132;
  return 0;
}

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace cuda
}  // namespace c10
