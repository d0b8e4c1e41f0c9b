// Grouped expert GEMM with MXFP4 weights on CUDA (moe_grouped_gemm_mxfp4, W4A16, spec §3.2);
// contract in registration.cpp. Weights are decoded inside the kernels, never stored whole in a
// wider dtype.
//
// bfloat16 activations (16-byte aligned x and blocks, sm_80+), two regimes chosen from N / E:
//   decode (N <= 32 E, a few rows per expert): mxfp4_gemv_kernel. Grid (M / 64 row slabs, active
//     experts), CTAs of 4 warps (8 when the grid is small: two K halves); each warp owns 16 weight
//     rows (of its K part) and streams their blocks with 16-byte loads (lane
//     (g, t) reads block 4s + t of rows 2g and 2g+1 at step s), decodes them in registers to
//     bfloat16 (exact: twice the E2M1 value from a prmt table, times 2^(scale-128)) and feeds them
//     as the A operand of mma.sync m16n8k16 against up to 8 NT of the expert's tokens staged in
//     shared memory (B operand). The k order inside an mma is permuted consistently for A and B
//     (see the kernel), which lets each lane own whole 32-element blocks.
//   prefill: the tensor-core grouped GEMM of moe_gemm.cuh with Mxfp4TcB as B source: each thread
//     loads 8 bytes of a weight row's block (global -> registers before the tile's math) and
//     decodes them to bfloat16 into the swizzled shared tile after it.
// float32 and float16 activations (and unaligned bfloat16): the SIMT grouped GEMM with the weights
// decoded exactly to float while loading the tile (float16 would not hold every MXFP4 value).
//
// Exactness: decoded values are exact for scale bytes 2..252 (all of gpt-oss); scale bytes 0 and 1
// make bfloat16 subnormals whose handling by the tensor cores is not guaranteed, and the SIMT
// path's fast-math FMAs flush float subnormals (|w| < 2^-126). Out-of-range values become inf,
// as in the reference.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <type_traits>

#include "cuda/moe_common.cuh"  // (includes common/moe_math.h)
#include "cuda/moe_gemm.cuh"
#include "cuda/utils.cuh"
#include "ops.h"

namespace gptoss::cuda {
namespace {

using Bf16 = c10::BFloat16;

__device__ __forceinline__ void st_shared_v4(uint32_t addr, const uint32_t (&v)[4]) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3])
               : "memory");
}

// Eight nibbles -> four bfloat16x2 of their MXFP4 values at a scale (bf16x2 factor 2^(scale-128)).
__device__ __forceinline__ void decode8_bf16(uint32_t w, uint32_t scale2, uint32_t (&out)[4]) {
  decode8_twice_bf16(w, out);
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = bf16x2_mul(out[i], scale2);
}

__device__ __forceinline__ uint32_t bf16x2_scale(uint32_t scale_byte) { return bf16_half_scale(scale_byte) * 0x00010001u; }

// ------------------------------------------------------------------ prefill: tensor-core B source

// B source of grouped_gemm_tc_kernel for MXFP4 weights (bfloat16 only). Tile row n = tid / 2 is
// weight row n0 + n; thread half h = tid % 2 takes bytes 8h..8h+7 of the row's block kt (elements
// 16h..16h+15 = 16-byte chunks 2h and 2h+1 of the tile row). blocks 8-byte aligned.
struct Mxfp4TcB {
  const uint8_t* blocks = nullptr;  // [E, M, KB, 16]
  const uint8_t* scales = nullptr;  // [E, M, KB]
  int64_t ncols = 0, kb = 0;
  const uint8_t* brow = nullptr;
  const uint8_t* srow = nullptr;
  uint2 raw = {0u, 0u};
  uint32_t sc = 0;

  __device__ __forceinline__ void begin_tile(int e, int64_t n0, int tid) {
    const int64_t n = n0 + (tid >> 1);
    if (n < ncols) {
      const int64_t row = static_cast<int64_t>(e) * ncols + n;
      brow = blocks + row * kb * 16 + (tid & 1) * 8;
      srow = scales + row * kb;
    } else {
      brow = srow = nullptr;
    }
  }
  __device__ __forceinline__ void issue(int kt, uint32_t, int) {
    if (brow != nullptr) {
      raw = *reinterpret_cast<const uint2*>(brow + static_cast<int64_t>(kt) * 16);
      sc = srow[kt];
    } else {
      raw = make_uint2(0u, 0u);  // +0 weights
      sc = 127u;
    }
  }
  __device__ __forceinline__ void finish(uint32_t stage, int tid) const {
    const uint32_t s2 = bf16x2_scale(sc);
    uint32_t lo[4], hi[4];
    decode8_bf16(raw.x, s2, lo);
    decode8_bf16(raw.y, s2, hi);
    const int r = tid >> 1, h = tid & 1;
    st_shared_v4(stage + tc_swz(r, 2 * h), lo);
    st_shared_v4(stage + tc_swz(r, 2 * h + 1), hi);
  }
};

// ------------------------------------------------------------------------- SIMT B source

// B source of grouped_gemm_simt_kernel: Bs[kk][n] = MXFP4 weight (n0 + n, k0 + kk) as exact float;
// thread tid decodes 4 consecutive k (2 bytes, one scale) of column n = tid / 4.
template <typename A>
struct Mxfp4SimtB {
  static constexpr bool kForward = true;
  const uint8_t* blocks = nullptr;
  const uint8_t* scales = nullptr;
  int64_t ncols = 0, red = 0, kb = 0;
  const uint8_t* brow = nullptr;
  const uint8_t* srow = nullptr;
  __device__ __forceinline__ void begin_tile(int e, int64_t n0, int tid) {
    const int64_t n = n0 + (tid >> 2);
    if (n < ncols) {
      const int64_t row = static_cast<int64_t>(e) * ncols + n;
      brow = blocks + row * kb * 16;
      srow = scales + row * kb;
    } else {
      brow = srow = nullptr;
    }
  }
  __device__ __forceinline__ void load(int64_t k0, A (*Bs)[kSimtBN + 4], int tid) const {
    const int n = tid >> 2, kk0 = (tid & 3) * 4;
    const int64_t k = k0 + kk0;  // a multiple of 4, so k..k+3 share a block (red % 32 == 0)
    if (brow != nullptr && k < red) {
      const int64_t blk = k >> 5;
      const int j = static_cast<int>(k & 31) >> 1;
      const uint32_t b0 = brow[blk * 16 + j], b1 = brow[blk * 16 + j + 1], s = srow[blk];
      Bs[kk0 + 0][n] = static_cast<A>(mxfp4_float(b0 & 15u, s));
      Bs[kk0 + 1][n] = static_cast<A>(mxfp4_float(b0 >> 4, s));
      Bs[kk0 + 2][n] = static_cast<A>(mxfp4_float(b1 & 15u, s));
      Bs[kk0 + 3][n] = static_cast<A>(mxfp4_float(b1 >> 4, s));
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) Bs[kk0 + q][n] = A(0);
    }
  }
};

// ------------------------------------------------------------------------------- decode: GEMV

constexpr int kGvWarps = 4;
constexpr int kGvRows = kGvWarps * 16;  // weight rows per CTA

// Raw data of one step (4 blocks = 128 k) for a lane: block kb of weight rows ma and mb.
struct GvRaw {
  uint4 a, b;
  uint32_t sa, sb;
};

// Decode regime, bfloat16. Grid (ceil(M / 64), min(E, N, 65535)); y walks j = blockIdx.y,
// + gridDim.y, ... over the experts with rows (tile_start built with one "tile" per non-empty
// expert, so the j-th active expert is tile_expert(j)). Block 128 KS threads = 4 KS warps; warp w
// is row group w % 4 and K part w / 4. Row group rg owns weight rows m0 + 16 rg + 2g (= "ma", A rows
// g) and m0 + 16 rg + 2g + 1 ("mb", A rows g + 8), g = lane / 4; K part kp takes the 128-wide steps
// s = kp, kp + KS, ... of each chunk. With KS > 1 the K parts' sums meet in shared memory (part 0
// adds parts 1.. KS-1 in order) and part 0 writes the outputs: KS = 2 doubles the warps of a grid
// too small to fill the SMs (a decode step's mlp2) without staging the tokens in more CTAs.
// Tokens of the expert go in groups of 8 NT (n8 tiles of the mma); for each K chunk of kc elements
// (a multiple of 128) their rows are staged as bfloat16 in shared memory: row stride rs bytes
// (rs / 16 = 2 mod 8), 16-byte chunk c of block b at position 4b + ((c ^ (b >> 1)) & 1 | c & 2)
// i.e. c ^ ((b >> 1) & 1), zero past K, NaN for a bad row_index; rows of absent tokens (past the
// expert's count) are left as they are (they only reach mma columns that are never stored).
//
// mma mapping at step s, lane (g, t), block b = 4s + t, word q (elements 8q..8q+7 of the block),
// half r: mma (q, r) takes virtual k {2t, 2t+1} <- real {8q + 4r, +1} and {2t+8, 2t+9} <- {8q + 4r + 2,
// +3} of block b. A (weights): a0/a2 = row ma pairs, a1/a3 = row mb pairs; B (tokens): b0/b1 = the
// same pairs of token g's row. Every lane with the same t uses the same real k, so A and B agree.
// S: the steps of weight loads a lane has in flight (the math of step s runs while steps s + 1 ..
// s + S - 1 are being fetched); the arithmetic, and so the result, does not depend on S.
// The weight decode is mxfp4_decode8_pow126_bf16 (shifts and masks: ~223 instructions per step in
// the SASS against ~280 with the prmt tables of the tensor-core kernel, 3% faster on the 20b decode
// step, H100, docs/gpu-results.md): word q gives the pairs (8q + j, 8q + j + 4), so the staged token
// chunks are permuted to the same pairs.
template <int NT, bool FUSED, int S, int KS>
__global__ void __launch_bounds__(kGvWarps * 32 * KS, 4 / KS)
    mxfp4_gemv_kernel(const GemmParams<Bf16, float> p, const uint8_t* __restrict__ blocks,
                      const uint8_t* __restrict__ scales, int kc, int rs) {
  constexpr int TOK = 8 * NT;
  extern __shared__ __align__(16) uint8_t xs[];  // [TOK][rs]
  static_assert(KS == 1 || KS == 2, "K parts");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const int rg = KS > 1 ? warp % kGvWarps : warp, kp = KS > 1 ? warp / kGvWarps : 0;
  Bf16* out = static_cast<Bf16*>(p.out);
  const int active = p.tile_start[p.num_experts];
  for (int j = blockIdx.y; j < active; j += gridDim.y) {  // block-uniform
    const int e = tile_expert(p.tile_start, p.num_experts, j);
    const int64_t lo = p.so[e], cnt = p.so[e + 1] - lo;
    const int64_t K = p.red, M = p.ncols, KB = K / 32;
    const int64_t ma = static_cast<int64_t>(blockIdx.x) * kGvRows + rg * 16 + 2 * g, mb = ma + 1;
    const uint8_t* ba = ma < M ? blocks + (static_cast<int64_t>(e) * M + ma) * KB * 16 : nullptr;
    const uint8_t* bb = mb < M ? blocks + (static_cast<int64_t>(e) * M + mb) * KB * 16 : nullptr;
    const uint8_t* sa = ma < M ? scales + (static_cast<int64_t>(e) * M + ma) * KB : nullptr;
    const uint8_t* sb = mb < M ? scales + (static_cast<int64_t>(e) * M + mb) * KB : nullptr;

    for (int64_t tok0 = 0; tok0 < cnt; tok0 += TOK) {
      float acc[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[n][c] = 0.f;

      for (int64_t kc0 = 0; kc0 < K; kc0 += kc) {
        const int steps = static_cast<int>(ceil_div_dev(min(static_cast<int64_t>(kc), K - kc0), 128));
        const int nsteps = KS == 1 ? steps : (steps > kp ? (steps - kp + KS - 1) / KS : 0);  // this K part's
        // The i-th step of this K part is step kp + KS i of the chunk: the lane's block there is
        // blk0 + 4 KS i of the chunk.
        const int blk0 = 4 * kp + t4;
        const int64_t kb0 = kc0 / 32 + blk0;
        auto load_step = [&](int i) {
          GvRaw r;
          r.a = r.b = make_uint4(0u, 0u, 0u, 0u);
          r.sa = r.sb = 127u;
          const int64_t kbi = kb0 + 4 * KS * i;
          if (i < nsteps && kbi < KB) {
            if (ba != nullptr) {
              r.a = *reinterpret_cast<const uint4*>(ba + kbi * 16);
              r.sa = sa[kbi];
            }
            if (bb != nullptr) {
              r.b = *reinterpret_cast<const uint4*>(bb + kbi * 16);
              r.sb = sb[kbi];
            }
          }
          return r;
        };
        // The first S - 1 steps' weights are requested before the tokens are staged (they land in
        // registers, which the barriers below do not order), so their latency overlaps the staging.
        GvRaw r[S];
#pragma unroll
        for (int i = 0; i < S - 1; ++i) r[i] = load_step(i);

        __syncthreads();  // previous chunk's readers are done
        const int cpr = kc / 8;  // 16-byte chunks per staged row
        // Only the group's real tokens are staged: the rows of absent tokens feed only their own
        // mma columns (B column n = token n), whose sums are never stored, so whatever those rows
        // hold is harmless. (A decode step has one token per expert: 1 row of 8.)
        const int ntok = static_cast<int>(min(static_cast<int64_t>(TOK), cnt - tok0));
        for (int q = tid; q < ntok * cpr; q += blockDim.x) {
          const int tok = q / cpr, c = q - tok * cpr;
          const int blk = c >> 2, wq = c & 3;
          const int64_t k = kc0 + 8 * static_cast<int64_t>(c);
          uint4 v = make_uint4(0u, 0u, 0u, 0u);
          const int64_t src = gemm_src_row(p.row_index, lo + tok0 + tok, p.a_rows);
          if (src < 0) {
            v = make_uint4(0x7FC07FC0u, 0x7FC07FC0u, 0x7FC07FC0u, 0x7FC07FC0u);  // bfloat16 NaN
          } else if (k < K) {
            v = *reinterpret_cast<const uint4*>(p.a + src * K + k);
            // (x0..x7) -> (x0, x4), (x1, x5), (x2, x6), (x3, x7): the decode's pairs
            v = make_uint4(prmt(v.x, v.z, 0x5410u), prmt(v.x, v.z, 0x7632u), prmt(v.y, v.w, 0x5410u),
                           prmt(v.y, v.w, 0x7632u));
          }
          *reinterpret_cast<uint4*>(xs + tok * rs + (blk * 4 + (wq ^ ((blk >> 1) & 1))) * 16) = v;
        }
        __syncthreads();

        // The i-th step: decode the lane's two weight blocks and multiply them with the staged tokens.
        auto consume = [&](const GvRaw& r0, int i) {
          uint32_t wa[4][4], wb[4][4];  // [word q][pair]
          const uint32_t ra[4] = {r0.a.x, r0.a.y, r0.a.z, r0.a.w}, rb[4] = {r0.b.x, r0.b.y, r0.b.z, r0.b.w};
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            mxfp4_decode8_pow126_bf16(ra[q], wa[q]);
            mxfp4_decode8_pow126_bf16(rb[q], wb[q]);
          }
          // x 2^(min(s, 128) - 1), then x 2^(s - 128) where some lane's scale byte exceeds 128
          // (bf16x2 factors: exponent fields min(s, 128) + 126 and max(s, 128) - 1)
          auto scale_rows = [&](uint32_t fa, uint32_t fb) {
#pragma unroll
            for (int q = 0; q < 4; ++q)
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                wa[q][j] = bf16x2_mul(wa[q][j], (fa << 7) * 0x00010001u);
                wb[q][j] = bf16x2_mul(wb[q][j], (fb << 7) * 0x00010001u);
              }
          };
          scale_rows(min(r0.sa, 128u) + 126u, min(r0.sb, 128u) + 126u);
          if (__any_sync(0xffffffffu, max(r0.sa, r0.sb) > 128u))  // warp-uniform
            scale_rows(max(r0.sa, 128u) - 1u, max(r0.sb, 128u) - 1u);
          const int blk = blk0 + 4 * KS * i;
          const uint32_t sw = static_cast<uint32_t>((blk >> 1) & 1);
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            const uint8_t* row = xs + (n * 8 + g) * rs + blk * 64;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              const uint4 xq = *reinterpret_cast<const uint4*>(row + ((static_cast<uint32_t>(q) ^ sw) << 4));
              const uint32_t xv[4] = {xq.x, xq.y, xq.z, xq.w};
              const uint32_t a0[4] = {wa[q][0], wb[q][0], wa[q][1], wb[q][1]};
              const uint32_t b0[2] = {xv[0], xv[1]};
              mma_16816<Bf16>(acc[n], a0, b0[0], b0[1]);
              const uint32_t a1[4] = {wa[q][2], wb[q][2], wa[q][3], wb[q][3]};
              const uint32_t b1[2] = {xv[2], xv[3]};
              mma_16816<Bf16>(acc[n], a1, b1[0], b1[1]);
            }
          }
        };
        // Step s sits in slot s % S. At step s the request for step s + S - 1 goes into the slot
        // that step s - 1 has just freed; u is unrolled, so every slot index is a constant
        // (registers, no local memory). Requests past the last step fetch nothing (load_step).
        for (int s0 = 0; s0 < nsteps; s0 += S) {
#pragma unroll
          for (int u = 0; u < S; ++u) {
            r[(u + S - 1) % S] = load_step(s0 + u + S - 1);
            if (s0 + u < nsteps) consume(r[u], s0 + u);  // warp-uniform
          }
        }
      }

      if constexpr (KS > 1) {  // K parts 1.. add into part 0 through shared memory (fixed order)
        float* red = reinterpret_cast<float*>(xs);  // [KS - 1][kGvWarps][32][NT * 4], host-sized
        __syncthreads();  // every warp is done reading this group's staged tokens
        if (kp > 0) {
          float* dst = red + ((static_cast<int64_t>(kp - 1) * kGvWarps + rg) * 32 + lane) * (NT * 4);
#pragma unroll
          for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) dst[n * 4 + c] = acc[n][c];
        }
        __syncthreads();
        if (kp > 0) continue;  // warp-uniform; the next group's staging starts with a barrier
        for (int q = 1; q < KS; ++q) {
          const float* src = red + ((static_cast<int64_t>(q - 1) * kGvWarps + rg) * 32 + lane) * (NT * 4);
#pragma unroll
          for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[n][c] += src[n * 4 + c];
        }
      }

      // acc[n][c]: weight row (c < 2 ? ma : mb), token tok0 + 8n + 2 t4 + (c & 1).
      const Bf16* bias = p.bias != nullptr ? p.bias + static_cast<int64_t>(e) * M : nullptr;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int64_t tok = tok0 + 8 * n + 2 * t4 + cc;
          if (tok >= cnt || ma >= M) continue;
          const int64_t gr = lo + tok;
          const bool bad = gemm_src_row(p.row_index, gr, p.a_rows) < 0;
          const bool has_b = mb < M;
          float va = acc[n][cc], vb = acc[n][2 + cc];
          if (bias != nullptr) {
            va += static_cast<float>(bias[ma]);
            if (has_b) vb += static_cast<float>(bias[mb]);
          }
          if constexpr (FUSED) {
            const float o = swiglu_fwd<float>(va, vb, p.alpha, p.limit);
            out[gr * (M / 2) + ma / 2] = bad ? quiet_nan<Bf16>() : static_cast<Bf16>(o);
          } else {
            if (bad) va = vb = std::numeric_limits<float>::quiet_NaN();
            Bf16* dst = out + gr * M + ma;
            if (has_b && M % 2 == 0) {
              *reinterpret_cast<uint32_t*>(dst) = pack2<Bf16>(va, vb);
            } else {
              dst[0] = static_cast<Bf16>(va);
              if (has_b) dst[1] = static_cast<Bf16>(vb);
            }
          }
        }
      }
    }
  }  // experts
}

// Shared-memory geometry of the GEMV: K chunk kc (a multiple of 128) and row stride rs bytes.
struct GvSmem {
  int kc = 0, rs = 0, bytes = 0;
};

GvSmem gemv_smem(int64_t K, int tok) {
  const int64_t budget = std::min<int64_t>(96 * 1024, max_smem_optin());
  const int64_t kround = ceil_div(K, 128) * 128;
  const int64_t kc = std::max<int64_t>(128, std::min<int64_t>(kround, ((budget / tok - 32) / 256) * 128));
  GvSmem s;
  s.kc = static_cast<int>(kc);
  s.rs = static_cast<int>(kc * 2 + 32);  // rs / 16 = 2 (mod 8): conflict-free 16-byte reads
  s.bytes = tok * s.rs;
  return s;
}

void launch_gemv(const GemmParams<Bf16, float>& p, const uint8_t* blocks, const uint8_t* scales, int64_t E, bool fused,
                 cudaStream_t stream) {
  const int64_t avg = ceil_div(p.n_rows, E);
  const int nt = avg <= 8 ? 1 : (avg <= 16 ? 2 : 4);
  const GvSmem sm = gemv_smem(p.red, 8 * nt);
  const dim3 grid(grid_x(ceil_div(p.ncols, kGvRows), "moe_grouped_gemm_mxfp4"),
                  static_cast<unsigned>(std::min<int64_t>({E, p.n_rows, 65535})));
  // Two K parts per CTA when one token group's grid would leave half the SMs' 4-CTA slots empty
  // (a decode step's mlp2: 180 CTAs for 528 slots on an H100): twice the warps streaming weights.
  const bool split = nt == 1 && 2 * static_cast<int64_t>(grid.x) * grid.y <= 4 * static_cast<int64_t>(sm_count());
  const int ks = split ? 2 : 1;
  TORCH_CHECK(ks == 1 || sm.bytes >= (ks - 1) * kGvWarps * 32 * 4 * nt * static_cast<int>(sizeof(float)),
              "moe_grouped_gemm_mxfp4: internal error, GEMV shared memory too small for the K-part sums");
  auto run = [&](auto kernel) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, sm.bytes));
    kernel<<<grid, kGvWarps * 32 * ks, sm.bytes, stream>>>(p, blocks, scales, sm.kc, sm.rs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // S: weight steps in flight per lane (S - 1 requested ahead of the math). One token group
  // (T <= 8 per expert, decode) leaves the SMs few warps: the bytes in flight set the bandwidth.
  if (nt == 1) {
    if (split) fused ? run(mxfp4_gemv_kernel<1, true, 5, 2>) : run(mxfp4_gemv_kernel<1, false, 5, 2>);
    else fused ? run(mxfp4_gemv_kernel<1, true, 5, 1>) : run(mxfp4_gemv_kernel<1, false, 5, 1>);
  } else if (nt == 2) {
    fused ? run(mxfp4_gemv_kernel<2, true, 3, 1>) : run(mxfp4_gemv_kernel<2, false, 3, 1>);
  } else {
    fused ? run(mxfp4_gemv_kernel<4, true, 3, 1>) : run(mxfp4_gemv_kernel<4, false, 3, 1>);
  }
}

// The decode (GEMV) kernel for up to this many grouped rows per expert on average.
constexpr int64_t kGemvMaxAvgRows = 32;

template <typename T>
void mxfp4_forward(const at::Tensor& x, const at::Tensor* ri, const at::Tensor& offsets, const at::Tensor& blocks,
                   const at::Tensor& scales, const at::Tensor* bias, bool fused, double alpha, double limit,
                   at::Tensor& out, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t N = out.size(0), E = blocks.size(0), M = blocks.size(1), KB = blocks.size(2), K = KB * 32;
  GemmParams<T, A> p = forward_params<T, A>(x, ri, E, N, K, M, bias, out, alpha, limit);
  const uint8_t* bl = blocks.const_data_ptr<uint8_t>();
  const uint8_t* sc = scales.const_data_ptr<uint8_t>();
  if constexpr (std::is_same_v<T, Bf16>) {
    if (is_aligned(x.const_data_ptr(), 16) && is_aligned(bl, 16) && has_sm80()) {
      if (N <= kGemvMaxAvgRows * E) {
        // One "tile" per expert with rows: tile_start ranks the active experts for the grid's y.
        const Schedule sched = make_schedule<T>(offsets, E, N, static_cast<int>(N), out.mutable_data_ptr<T>(),
                                                out.size(1), stream);
        p.so = sched.so();
        p.tile_start = sched.tile_start();
        launch_gemv(p, bl, sc, E, fused, stream);
      } else {
        const Schedule sched = make_schedule<T>(offsets, E, N, kTcBM, out.mutable_data_ptr<T>(), out.size(1), stream);
        p.so = sched.so();
        p.tile_start = sched.tile_start();
        Mxfp4TcB b;
        b.blocks = bl;
        b.scales = sc;
        b.ncols = M;
        b.kb = KB;
        launch_gemm_tc<T>(p, b, fused, stream);
      }
      return;
    }
  }
  const Schedule sched = make_schedule<T>(offsets, E, N, kSimtBM, out.mutable_data_ptr<T>(), out.size(1), stream);
  p.so = sched.so();
  p.tile_start = sched.tile_start();
  Mxfp4SimtB<A> b;
  b.blocks = bl;
  b.scales = sc;
  b.ncols = M;
  b.red = K;
  b.kb = KB;
  launch_gemm_simt<T, A, Mxfp4SimtB<A>, T>(p, b, fused, stream);
}

at::Tensor moe_grouped_gemm_mxfp4(const at::Tensor& x_in, const c10::optional<at::Tensor>& row_index_in,
                                  const at::Tensor& offsets_in, const at::Tensor& blocks_in,
                                  const at::Tensor& scales_in, const c10::optional<at::Tensor>& bias_in,
                                  bool fused_swiglu, double alpha, double limit) {
  const int64_t N = check_moe_grouped_gemm_mxfp4(x_in, row_index_in, offsets_in, blocks_in, scales_in, bias_in,
                                                 fused_swiglu, alpha, limit);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), blocks = blocks_in.contiguous(), scales = scales_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const bool has_ri = row_index_in.has_value() && row_index_in->defined();
  const at::Tensor ri = has_ri ? row_index_in->contiguous() : at::Tensor();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const int64_t M = blocks.size(1), K = blocks.size(2) * 32;
  constexpr int64_t lim = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(N < lim && M < lim && K < lim, "moe_grouped_gemm_mxfp4: N, M and K must be < 2^31-1 on CUDA, got N=", N,
              ", M=", M, ", K=", K);
  const int64_t out_cols = fused_swiglu ? M / 2 : M;
  at::Tensor out = at::empty({N, out_cols}, x.options());
  if (N == 0 || out_cols == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_grouped_gemm_mxfp4_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {  // (float64 x is rejected by the checks)
      mxfp4_forward<scalar_t>(x, has_ri ? &ri : nullptr, offsets, blocks, scales, has_bias ? &bias : nullptr,
                              fused_swiglu, alpha, limit, out, stream);
    }
  });
  return out;
}

// moe_experts_mxfp4. Decode-sized bfloat16 calls (T k <= kPrepMaxSlots slots, E <= kPrepMaxExperts,
// the GEMV regime, 16-byte aligned x and weights) take four launches: moe_decode_prep (routing,
// dispatch and the GEMV schedule in one block), the two GEMVs and the combine. That is the
// arithmetic of the op sequence (moe_experts_mxfp4_ops), which every other call runs and which
// spends about twelve launches at these sizes (route; count, scan, scatter and a memset in
// dispatch; a schedule per GEMM; the combine's inverse permutation).
at::Tensor moe_experts_mxfp4(const at::Tensor& x_in, const at::Tensor& logits_in, int64_t k,
                             const at::Tensor& mlp1_blocks, const at::Tensor& mlp1_scales, const at::Tensor& mlp1_bias,
                             const at::Tensor& mlp2_blocks, const at::Tensor& mlp2_scales, const at::Tensor& mlp2_bias,
                             double alpha, double limit) {
  check_moe_experts_mxfp4(x_in, logits_in, k, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales,
                          mlp2_bias, alpha, limit);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t T = x_in.size(0), d = x_in.size(1), E = logits_in.size(1), n = T * k;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor bl1 = mlp1_blocks.contiguous(), bl2 = mlp2_blocks.contiguous();
  const bool decode = x.scalar_type() == at::kBFloat16 && n >= 1 && n <= kPrepMaxSlots && E <= kPrepMaxExperts &&
                      n <= kGemvMaxAvgRows * E && has_sm80() && is_aligned(x.const_data_ptr(), 16) &&
                      is_aligned(bl1.const_data_ptr(), 16) && is_aligned(bl2.const_data_ptr(), 16);
  if (!decode) {
    return moe_experts_mxfp4_ops(x_in, logits_in, k, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales,
                                 mlp2_bias, alpha, limit);
  }
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor sc1 = mlp1_scales.contiguous(), sc2 = mlp2_scales.contiguous();
  const at::Tensor bias1 = mlp1_bias.contiguous(), bias2 = mlp2_bias.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // int32 [order n | row_token n | inv n | so E+1 | tile_start E+1]
  at::Tensor idx = at::empty({3 * n + 2 * (E + 1)}, x.options().dtype(at::kInt));
  int32_t* order = idx.mutable_data_ptr<int32_t>();
  int32_t *row_token = order + n, *inv = order + 2 * n, *so = order + 3 * n, *tile_start = so + E + 1;
  at::Tensor weights = at::empty({T, k}, x.options().dtype(at::kFloat));
  moe_decode_prep(logits, k, weights, order, row_token, inv, so, tile_start, stream);

  const int64_t M1 = bl1.size(1), I = M1 / 2;
  const at::Tensor ri = idx.narrow(0, n, n);
  at::Tensor a = at::empty({n, I}, x.options());
  GemmParams<Bf16, float> p1 = forward_params<Bf16, float>(x, &ri, E, n, d, M1, &bias1, a, alpha, limit);
  p1.so = so;
  p1.tile_start = tile_start;
  launch_gemv(p1, bl1.const_data_ptr<uint8_t>(), sc1.const_data_ptr<uint8_t>(), E, true, stream);
  at::Tensor y = at::empty({n, d}, x.options());
  GemmParams<Bf16, float> p2 = forward_params<Bf16, float>(a, nullptr, E, n, I, d, &bias2, y, alpha, limit);
  p2.so = so;
  p2.tile_start = tile_start;
  launch_gemv(p2, bl2.const_data_ptr<uint8_t>(), sc2.const_data_ptr<uint8_t>(), E, false, stream);
  at::Tensor out = at::empty({T, d}, x.options());
  launch_combine(y, inv, weights, out, stream);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gptoss_ext, CUDA, m) {
  m.impl("moe_grouped_gemm_mxfp4", &moe_grouped_gemm_mxfp4);
  m.impl("moe_experts_mxfp4", &moe_experts_mxfp4);
}

}  // namespace gptoss::cuda
