#pragma once
#include "common/macros.h"

namespace gptoss {

// Half-split (NeoX) rotation of one pair (x[i], x[i + D/2]) by (cos, sin), spec §2.3:
// o1 = x1*cos - x2*sin, o2 = x2*cos + x1*sin. The backward is the same rotation with -sin.
template <typename F>
GPTOSS_HD void rope_rotate(F x1, F x2, F c, F s, F& o1, F& o2) {
  o1 = x1 * c - x2 * s;
  o2 = x2 * c + x1 * s;
}

}  // namespace gptoss
