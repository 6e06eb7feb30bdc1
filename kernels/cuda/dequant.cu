#include "kernels/cuda/dequant.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "kernels/base.h"

namespace fineserve::cuda {
namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}

// One thread per pair of output elements: int4 codes arrive two per byte (low nibble first,
// stored as code + 8), so a thread reads one byte and writes one half2.
__global__ void dequant_int4(const uint8_t* __restrict__ codes,   // [rows, cols / 2]
                             const __half* __restrict__ scales,   // [rows, cols / group]
                             const float* __restrict__ offsets,   // [rows, cols / group] or null
                             int64_t rows, int64_t cols, int64_t group,
                             __half2* __restrict__ out) {          // [rows, cols / 2]
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t half_cols = cols / 2;
  if (i >= rows * half_cols) return;
  const int64_t r = i / half_cols, c = (i % half_cols) * 2;
  const uint8_t b = codes[i];
  const int64_t gi = r * (cols / group) + c / group;
  const float s = __half2float(scales[gi]);
  const float o = offsets ? offsets[gi] : 0.0f;  // asymmetric: code * scale + offset, rounded once
  const float lo = fmaf(static_cast<float>(static_cast<int>(b & 0xF) - 8), s, o);
  const float hi = fmaf(static_cast<float>(static_cast<int>(b >> 4) - 8), s, o);
  out[i] = __floats2half2_rn(lo, hi);
}

__global__ void dequant_int8(const int8_t* __restrict__ codes,  // [rows, cols]
                             const __half* __restrict__ scales,  // [rows, cols / group]
                             const float* __restrict__ offsets,  // [rows, cols / group] or null
                             int64_t rows, int64_t cols, int64_t group,
                             __half* __restrict__ out) {          // [rows, cols]
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t r = i / cols, c = i % cols;
  const int64_t gi = r * (cols / group) + c / group;
  out[i] = __float2half_rn(fmaf(static_cast<float>(codes[i]), __half2float(scales[gi]), offsets ? offsets[gi] : 0.0f));
}

}  // namespace

bool device_available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

void dequantize_f16(const WeightMatrix& w, uint16_t* out) {
  FS_ASSERT(w.quantized() && (w.bits == 4 || w.bits == 8));
  constexpr int kThreads = 256;
  const auto* scales = reinterpret_cast<const __half*>(w.scales);
  if (w.bits == 4) {
    const int64_t n = w.rows * (w.cols / 2);
    const auto blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
    dequant_int4<<<blocks, kThreads>>>(static_cast<const uint8_t*>(w.data), scales, w.offsets, w.rows, w.cols,
                                       w.group, reinterpret_cast<__half2*>(out));
  } else {
    const int64_t n = w.rows * w.cols;
    const auto blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
    dequant_int8<<<blocks, kThreads>>>(static_cast<const int8_t*>(w.data), scales, w.offsets, w.rows, w.cols,
                                       w.group, reinterpret_cast<__half*>(out));
  }
  check(cudaGetLastError(), "dequantize launch");
  check(cudaDeviceSynchronize(), "dequantize");
}

}  // namespace fineserve::cuda
