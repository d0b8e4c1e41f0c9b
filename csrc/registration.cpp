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

  // Attention with learned sinks, GQA, causal + optional sliding window (spec §2.2).
  // q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D], Hq % Hkv == 0 (query head h uses kv head h / (Hq/Hkv));
  // sinks [Hq] any float dtype (used in float32) or None. Query i sits at position q_offset + i and
  // sees key j iff j <= q_offset + i and (window == 0 or j > q_offset + i - window).
  // out [B, Tq, Hq, D] in q's dtype; lse [B, Hq, Tq] float32 (float64 for float64 q), natural log,
  // including the sink. A row with no visible key has out 0 and lse = sink (or -inf).
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? sinks, float sm_scale, int window, int q_offset)"
        " -> (Tensor out, Tensor lse)");
  // grad_sinks is [Hq] in sinks' dtype, or an empty tensor when sinks is None.
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? sinks, Tensor out,"
        " Tensor lse, float sm_scale, int window, int q_offset)"
        " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_sinks)");
  // KV cache: k_cache, v_cache [B, S, Hkv, D]; lengths [B] int32 = tokens already cached per
  // sequence (the position of the first new token). Token position p lives in slot p % S: with
  // ring=false the cache must hold every position (lengths + Tn <= S, else an error), with
  // ring=true it keeps the last S positions (sliding-window layers).
  m.def("kv_cache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor lengths,"
        " bool ring) -> ()");
  // Attention of Tq new tokens per sequence over the cache (after kv_cache_append with the same
  // lengths): query i of sequence b sits at position lengths[b] + i. ring=true needs window > 0
  // and S >= window + Tq - 1 so that every visible key is still in the ring.
  m.def("attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, Tensor? sinks,"
        " float sm_scale, int window, bool ring) -> (Tensor out, Tensor lse)");
}

// `import gptoss_ext._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
