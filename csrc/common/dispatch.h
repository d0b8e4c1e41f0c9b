#pragma once
#include <ATen/Dispatch.h>

// The storage dtypes whose CPU kernels run vectorised in float32: float, bfloat16, half.
// (float64 takes a separate scalar path, used for gradcheck.)
#define GPTOSS_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
