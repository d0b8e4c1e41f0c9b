#pragma once
// GPTOSS_HD marks math that both backends compile: the CPU kernels and the CUDA kernels run the
// exact same inline functions, so CPU tests exercise the GPU's arithmetic too.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define GPTOSS_HD __host__ __device__ __forceinline__
#else
#define GPTOSS_HD inline
#endif
