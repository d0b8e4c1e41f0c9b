"""Runs the MXFP4 decode GEMV (csrc/cuda/moe_gemm_mxfp4.cu: mxfp4_gemv_kernel and launch_gemv, their
real source) on the CPU emulator of emu.h, against the CPU kernel of moe_grouped_gemm_mxfp4.

The kernel's text and the helpers it calls are cut out of the CUDA sources at run time and compiled
as host C++ with stand-ins for the PTX it uses (prmt, the bf16x2 multiply, __any_sync, mma.sync via
emu.h). Shared memory starts as NaN bytes in the emulator, so a read of anything the kernel did not
write reaches the results. For sessions without a GPU; not part of the test suite (the CUDA tests
on a GPU are the real check). Usage, from the repository root with the extension built:

    python scripts/cuda_emu/gemv_emu.py [--quick]
"""
import argparse
import os
import re
import sys
import time

import torch

from emu_build import PRELUDE as BASE_PRELUDE, ROOT, compile_module, emu_launches, function_at

import gptoss_ext  # noqa: E402,F401  (the CPU op, the reference here)


PRELUDE = BASE_PRELUDE + r'''
#include "common/moe_math.h"

namespace gptoss::cuda {

// PTX prmt.b32, default mode: byte i of the result is byte sel[4i+2:4i] of {b, a}, or that byte's
// sign replicated when sel bit 4i+3 is set.
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint8_t bytes[8];
  memcpy(bytes, &a, 4);
  memcpy(bytes + 4, &b, 4);
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t s = (sel >> (4 * i)) & 15u;
    uint32_t byte = bytes[s & 7u];
    if (s & 8u) byte = (byte & 0x80u) ? 0xFFu : 0u;
    d |= byte << (8 * i);
  }
  return d;
}

// HMUL2.BF16: each half multiplied in float and rounded to bfloat16 (nearest even).
inline uint32_t bf16x2_mul(uint32_t x, uint32_t y) {
  float xl, xh, yl, yh;
  unpack2<__nv_bfloat16>(x, xl, xh);
  unpack2<__nv_bfloat16>(y, yl, yh);
  return pack2<__nv_bfloat16>(xl * yl, xh * yh);
}

template <typename T>
T quiet_nan() { return std::numeric_limits<T>::quiet_NaN(); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t ceil_div_dev(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline unsigned grid_x(int64_t n, const char*) { return static_cast<unsigned>(n); }
inline int max_smem_optin() { return 232448; }  // sm_90
inline int sm_count() {
  const char* e = getenv("EMU_SMS");
  return e ? atoi(e) : 132;
}

using Bf16 = c10::BFloat16;
'''

HOST = r'''
}  // namespace gptoss::cuda

// out = the GEMV of the grouped rows (schedule built here as moe_grouped_gemm_mxfp4 builds it).
torch::Tensor gemv(torch::Tensor x, c10::optional<torch::Tensor> row_index, torch::Tensor offsets,
                   torch::Tensor blocks, torch::Tensor scales, c10::optional<torch::Tensor> bias, bool fused,
                   double alpha, double limit) {
  using namespace gptoss::cuda;
  const int64_t E = blocks.size(0), M = blocks.size(1), K = blocks.size(2) * 32;
  const int64_t N = offsets[E].item<int64_t>();
  torch::Tensor out = torch::empty({N, fused ? M / 2 : M}, x.options());
  torch::Tensor so = offsets.to(torch::kInt).contiguous();
  torch::Tensor ts = torch::zeros({E + 1}, so.options());
  const int32_t* o = so.data_ptr<int32_t>();
  int32_t* t = ts.data_ptr<int32_t>();
  for (int64_t e = 0; e < E; ++e) t[e + 1] = t[e] + (o[e + 1] > o[e] ? 1 : 0);
  GemmParams<Bf16, float> p;
  p.a = x.data_ptr<Bf16>();
  p.row_index = row_index ? row_index->data_ptr<int32_t>() : nullptr;
  p.a_rows = x.size(0);
  p.so = o;
  p.tile_start = t;
  p.num_experts = static_cast<int>(E);
  p.n_rows = N;
  p.red = K;
  p.ncols = M;
  p.bias = bias ? bias->data_ptr<Bf16>() : nullptr;
  p.out = out.data_ptr<Bf16>();
  p.alpha = static_cast<float>(alpha);
  p.limit = static_cast<float>(limit);
  launch_gemv(p, blocks.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), E, fused, nullptr);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemv", &gemv); }
'''


def generate():
    common = open(os.path.join(ROOT, "csrc/cuda/moe_common.cuh")).read()
    gemm = open(os.path.join(ROOT, "csrc/cuda/moe_gemm.cuh")).read()
    mx = open(os.path.join(ROOT, "csrc/cuda/moe_gemm_mxfp4.cu")).read()
    parts = [PRELUDE]
    parts.append(common[common.index("constexpr uint32_t kTwiceHi0"):common.index("// Eight E2M1 nibbles")])
    for start in ("__device__ __forceinline__ void decode8_twice_bf16", "__device__ __forceinline__ uint32_t bf16_half_scale",
                  "__device__ __forceinline__ int tile_expert"):
        parts.append(function_at(common, start))
    parts.append(function_at(gemm, "template <typename T, typename A>\nstruct GemmParams"))
    parts.append(function_at(gemm, "__device__ __forceinline__ int64_t gemm_src_row"))
    for start in ("__device__ __forceinline__ void decode8_bf16", "__device__ __forceinline__ uint32_t bf16x2_scale"):
        parts.append(function_at(mx, start))
    parts.append(mx[mx.index("constexpr int kGvWarps"):mx.index("// The decode (GEMV) kernel for up to this many")])
    parts.append(HOST)
    s = "\n".join(parts)
    s = s.replace("using gptoss::mxfp4", "//")
    s = re.sub(r"extern __shared__ __align__\(\d+\) uint8_t (\w+)\[\];", r"uint8_t* \1 = ::emu::smem_raw();", s)
    s = s.replace("mma_16816<Bf16>", "mma_16816<__nv_bfloat16>").replace("pack2<Bf16>", "pack2<__nv_bfloat16>")
    return emu_launches(s.replace("GPTOSS_NEED_SM80();", ""))


def build():
    return compile_module("gemv_emu", generate())


def case(mod, E, counts, K, M, fused, ri_mode, seed):
    g = torch.Generator().manual_seed(seed)
    N = sum(counts)
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
    R = max(N, 1) + 3
    x = torch.randn(R, K, generator=g).bfloat16()
    ri = None
    if ri_mode != "none":
        ri = torch.randint(0, R, (N,), generator=g, dtype=torch.int32)
        if ri_mode == "bad" and N:
            ri[N // 2] = R + 5  # a row outside x: NaN row out
    else:
        x = x[:N].contiguous()
    blocks = torch.randint(0, 256, (E, M, K // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(112, 125, (E, M, K // 32), generator=g, dtype=torch.uint8)
    scales.view(-1)[:: 7] = 127 - 7
    bias = (torch.randn(E, M, generator=g) * 0.1).bfloat16()
    alpha, limit = 1.702, 7.0
    t = time.time()
    got = mod.gemv(x, ri, offsets, blocks, scales, bias, fused, alpha, limit)
    dt = time.time() - t
    # The CPU op rejects a row index outside x; the CUDA kernel writes a NaN row for it.
    bad = ri is not None and ri_mode == "bad" and N > 0
    ri_ok = ri.clamp(max=R - 1) if bad else ri
    want = torch.ops.gptoss_ext.moe_grouped_gemm_mxfp4(x, ri_ok, offsets, blocks, scales, bias, fused, alpha, limit)
    if bad:
        want[N // 2] = float("nan")
    nan_ok = torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    err = ((got.float() - want.float())[finite].abs().max().item() if finite.any() else 0.0)
    scale = want.float()[finite].abs().max().item() if finite.any() else 1.0
    ok = nan_ok and err <= 0.02 * max(scale, 1e-3)
    print(f"{'ok  ' if ok else 'FAIL'} E={E} counts={counts} K={K} M={M} fused={fused} ri={ri_mode}: "
          f"max err {err:.3g} (max |out| {scale:.3g}), NaN rows {'match' if nan_ok else 'DIFFER'}; {dt:.1f} s")
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    mod = build()
    cases = [
        # decode-like: one token per expert, 4 of 8 experts active; K past one 128-step, M past one CTA
        dict(E=8, counts=[1, 0, 0, 1, 1, 0, 1, 0], K=352, M=160, fused=True, ri_mode="index"),
        dict(E=8, counts=[1, 0, 0, 1, 1, 0, 1, 0], K=352, M=96, fused=False, ri_mode="none"),
        # several tokens per expert (NT = 1, 2, 4 groups), a bad row index
        dict(E=3, counts=[3, 9, 0], K=160, M=64, fused=True, ri_mode="bad"),
        dict(E=2, counts=[17, 5], K=96, M=66, fused=False, ri_mode="index"),
        dict(E=2, counts=[33, 30], K=64, M=32, fused=True, ri_mode="index"),
    ]
    if not a.quick:  # a gpt-oss-20b mlp2 shape at decode (K = M = 2880, 4 of 32 experts)
        cases.append(dict(E=32, counts=[1 if e in (3, 9, 17, 30) else 0 for e in range(32)], K=2880, M=2880,
                          fused=False, ri_mode="none"))
    fails = 0
    for i, c in enumerate(cases):
        # EMU_SMS: the SM count launch_gemv sees (132: small grids take the two-K-part CTAs; 1: never)
        for sms in ("132", "1"):
            os.environ["EMU_SMS"] = sms
            print(f"[sms={sms}] ", end="")
            fails += not case(mod, seed=i, **c)
    print("FAILED:", fails) if fails else print("all passed")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
