// CUDA: linear layers y = x · wᵀ (+ bias) for FineQuant int4/int8 and dense weights.
//
// Weights are re-laid out once, at upload, for the kernels (the checkpoint layout stays
// backend-neutral, DESIGN: Weights). linear() picks the kernel by M (tokens in the step):
// a CUDA-core GEMV that streams the weights once for small M, a fused dequantize + tensor-core
// GEMM for mid M, and a dequantize-to-fp16 + cuBLAS GEMM for large M.
// Pointers are device memory; everything runs on the stream given at construction. The first
// call that needs one allocates a workspace and keeps it: split-K partial sums (32 MiB) and the
// dequantized weights of the large-M path (the whole matrix, up to 2 GiB while the device keeps
// enough memory free, else at least 64 MiB slabs of rows). The device layout and the split rules
// live in kernels/cuda/gemm_layout.h (host code, tested without a GPU).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "kernels/ops.h"

namespace fineserve::cuda {

// Which kernel runs a quantized linear (Auto picks by M; the others exist for tests and bench).
enum class GemmPath { Auto, Gemv, TensorCore, DequantCublas };

// Knobs for tests and the sanitizer runs; the defaults are what serving uses.
struct GemmOptions {
  // Split-K slices of the Gemv and TensorCore paths: 0 picks them from the grid (gemm_layout.h
  // plan_split); a positive count forces that many (capped by the work and the workspace), so a
  // test can put slice boundaries inside a quantization group.
  int64_t force_splits = 0;
  // Fill the split-K and dequantization workspaces with NaN bytes before every use, so a kernel
  // that reads a slot no kernel of this call wrote shows up as NaN in the output.
  bool poison_workspaces = false;
  // Largest dequantization workspace of the DequantCublas path (0: 2 GiB); a smaller one makes it
  // go through the matrix in slabs of rows, as on a device short of memory.
  size_t max_dequant_bytes = 0;
};

class Gemm {
 public:
  // act: the activation dtype (F16 or BF16) of every x and y this object sees.
  Gemm(DType act, cudaStream_t stream, const GemmOptions& options = {});
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // Copies `host` (host memory, checkpoint layout: ops.h WeightMatrix) to the device in the
  // layout the kernels read. Dense weights are converted to the activation dtype. The returned
  // matrix keeps rows/cols/bits/group; data/scales point to device memory owned by this object.
  WeightMatrix upload(const WeightMatrix& host);

  // y[m, w.rows] = x[m, w.cols] · wᵀ (+ bias[w.rows] of bias_dtype F32/F16/BF16 when not null),
  // fp32 accumulation, y in the activation dtype. `w` must come from upload().
  void linear(const WeightMatrix& w, const void* x, int64_t m, const void* bias, DType bias_dtype, void* y,
              GemmPath path = GemmPath::Auto);

  // The path Auto takes for this matrix at this M.
  GemmPath choose(const WeightMatrix& w, int64_t m) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fineserve::cuda
