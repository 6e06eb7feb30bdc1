// The CUDA dequantization kernel against the CPU quantizer's dequantization (skipped without a GPU).
#include <gtest/gtest.h>

#ifdef FINESERVE_HAVE_CUDA
#include <cuda_runtime.h>

#include <random>
#include <vector>

#include "kernels/cuda/dequant.h"
#include "kernels/half.h"
#include "quant/quantizer.h"
#endif

namespace fineserve {
namespace {

#ifdef FINESERVE_HAVE_CUDA
void run_case(int bits, int64_t rows, int64_t cols, int64_t group) {
  std::mt19937 rng(static_cast<unsigned>(rows * 131 + cols + bits));
  std::normal_distribution<float> normal(0.0f, 0.05f);
  std::vector<float> w(static_cast<size_t>(rows * cols));
  for (float& v : w) v = normal(rng);
  const quant::QuantizedMatrix q = quant::quantize({w.data(), DType::F32, rows, cols}, bits, group);
  const std::vector<float> expected = quant::dequantize(q);

  void *d_codes = nullptr, *d_scales = nullptr, *d_out = nullptr;
  ASSERT_EQ(cudaMalloc(&d_codes, q.codes.size()), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&d_scales, q.scales.size() * 2), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&d_out, w.size() * 2), cudaSuccess);
  cudaMemcpy(d_codes, q.codes.data(), q.codes.size(), cudaMemcpyHostToDevice);
  cudaMemcpy(d_scales, q.scales.data(), q.scales.size() * 2, cudaMemcpyHostToDevice);
  cudaMemset(d_out, 0xff, w.size() * 2);  // poison: NaN halves
  WeightMatrix m;
  m.rows = rows;
  m.cols = cols;
  m.bits = bits;
  m.group = group;
  m.dtype = bits == 4 ? DType::U8 : DType::I8;
  m.data = d_codes;
  m.scales = static_cast<const uint16_t*>(d_scales);
  cuda::dequantize_f16(m, static_cast<uint16_t*>(d_out));
  std::vector<uint16_t> got(w.size());
  cudaMemcpy(got.data(), d_out, got.size() * 2, cudaMemcpyDeviceToHost);
  cudaFree(d_codes);
  cudaFree(d_scales);
  cudaFree(d_out);
  // code * scale is exact in fp32; the only difference is the final rounding to fp16.
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_EQ(got[i], float_to_half(expected[i])) << "bits " << bits << " element " << i;
}
#endif

TEST(CudaDequant, MatchesCpuDequantization) {
#ifndef FINESERVE_HAVE_CUDA
  GTEST_SKIP() << "built without CUDA";
#else
  if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  for (int bits : {4, 8}) {
    run_case(bits, 1, 32, 32);
    run_case(bits, 3, 96, 32);
    run_case(bits, 17, 768, 768);
    run_case(bits, 129, 5120, 1024);
  }
#endif
}

}  // namespace
}  // namespace fineserve
