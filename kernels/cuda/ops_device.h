// Device-side helpers shared by the ops*.cu kernels (include from .cu files only): conversions
// between the activation types and fp32, loads of tensors whose dtype is known only at run time,
// warp and block reductions, and the act-dtype dispatch of the launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels/base.h"
#include "kernels/dtype.h"

namespace fineserve::cuda::dev {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Element i of a float tensor of run-time dtype F32/F16/BF16 (parameters, biases and embedding
// tables stay in their checkpoint dtype). The branch is uniform across a launch.
__device__ __forceinline__ float load_any(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Sets `bit` in the backend's fault word. The word lives in mapped pinned host memory, which device
// atomics may not reach on every platform, so this is a plain read-modify-write: two faults racing
// may keep only one bit, but a fault is never lost altogether.
__device__ __forceinline__ void raise_fault(int* fault, int bit) {
  volatile int* f = fault;
  *f = *f | bit;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Sum of v over the block, returned to every thread (blockDim.x a multiple of 32, scratch [32] in
// shared memory). Every thread adds the warp totals in the same order, so all get the same value.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  __syncthreads();  // a previous call may still be reading scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < n_warps; ++w) total += scratch[w];
  return total;
}

}  // namespace fineserve::cuda::dev

namespace fineserve::cuda {

// Calls f(T{}) with T the CUDA type of the activation dtype.
template <class F>
void dispatch_act(DType act, F&& f) {
  switch (act) {
    case DType::F16: f(__half{}); return;
    case DType::BF16: f(__nv_bfloat16{}); return;
    default: FS_ASSERT(false, "CUDA activations are F16 or BF16");
  }
}

// Blocks of `threads` for a grid-stride loop over n elements (the cap keeps the grid small; each
// thread then takes several elements).
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > (1 << 20) ? (1 << 20) : blocks));
}

inline void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw Error(std::string("CUDA error launching ") + what + ": " + cudaGetErrorString(e));
}

}  // namespace fineserve::cuda
