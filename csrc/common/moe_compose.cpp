// moe_experts_mxfp4 as a sequence of the MoE ops, called through the dispatcher so that it runs on
// whichever backend the inputs live on (contract: registration.cpp, ops.h).
#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

#include "ops.h"

namespace gptoss {
namespace {

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace

at::Tensor moe_experts_mxfp4_ops(const at::Tensor& x, const at::Tensor& router_logits, int64_t k,
                                 const at::Tensor& mlp1_blocks, const at::Tensor& mlp1_scales,
                                 const at::Tensor& mlp1_bias, const at::Tensor& mlp2_blocks,
                                 const at::Tensor& mlp2_scales, const at::Tensor& mlp2_bias, double alpha,
                                 double limit) {
  check_moe_experts_mxfp4(x, router_logits, k, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales,
                          mlp2_bias, alpha, limit);
  using Opt = c10::optional<at::Tensor>;
  static const auto route = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>(
      "gptoss_ext::moe_route");
  static const auto dispatch =
      op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>("gptoss_ext::moe_dispatch");
  static const auto gemm = op_handle<at::Tensor(const at::Tensor&, const Opt&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const Opt&, bool, double, double)>(
      "gptoss_ext::moe_grouped_gemm_mxfp4");
  static const auto combine =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("gptoss_ext::moe_combine");
  const auto [weights, experts] = route.call(router_logits, k);
  const auto [order, row_token, offsets] = dispatch.call(experts, router_logits.size(1));
  const at::Tensor a = gemm.call(x, row_token, offsets, mlp1_blocks, mlp1_scales, mlp1_bias, true, alpha, limit);
  const at::Tensor y = gemm.call(a, c10::nullopt, offsets, mlp2_blocks, mlp2_scales, mlp2_bias, false, alpha, limit);
  return combine.call(y, order, weights);
}

}  // namespace gptoss
