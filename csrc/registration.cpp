// Every op schema of gptoss_ext, once. Kernels register per backend in cpu/*.cpp and cuda/*.cu;
// fake (meta) kernels and autograd live in gptoss_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(gptoss_ext, m) {
  // RMSNorm (spec §2.1). x [..., d]; scale [d]; out like x; rstd = 1/sqrt(mean(x^2)+eps) per row,
  // shape x.shape[:-1], float32 (float64 for float64 x).
  m.def("rms_norm(Tensor x, Tensor scale, float eps) -> (Tensor out, Tensor rstd)");
  // grad_x like x; grad_scale [d] in scale's dtype.
  m.def("rms_norm_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor rstd)"
        " -> (Tensor grad_x, Tensor grad_scale)");
  // Half-split RoPE (spec §2.3). x [B, T, H, D] or [T, H, D]; cos, sin [T, D/2] or [B, T, D/2]
  // (already multiplied by the YaRN concentration). The backward is apply_rope(grad, cos, -sin).
  m.def("apply_rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

// `import gptoss_ext._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
