// The fast CPU linear layer: y[m, N] = x[m, K] · Wᵀ (+ bias) for FineQuant int4 / int8 codes and
// dense F32 / F16 / BF16 weights, multi-threaded over N (OpenMP) and vectorised with AVX2 + FMA
// (the quantized GEMV with AVX-512 where the CPU has it).
//
// Weights are re-laid out once, at upload time, by pack_weight() (layout in gemm.cpp); the
// checkpoint format stays as it is. Accumulation is fp32 and activations stay fp32 (weight-only
// quantization: x is never quantized). This is the exact path, the CPU default; gemm_a8.h runs the
// optional int8-activation path on the same packed layout.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu/aligned.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/ops.h"

namespace fineserve::cpu {

struct PackedWeight {
  WeightMatrix shape;  // rows, cols, dtype, bits, group of the source (data/scales point at ours)
  int64_t tiles = 0;   // ceil(rows / 4): rows are packed 4 at a time
  int64_t blocks = 0;  // ceil(cols / 32): columns are packed 32 at a time, zero padded
  int64_t groups = 1;  // scale groups per row (1 for dense)
  int64_t blocks_per_group = 0;
  AlignedBytes codes;   // [tiles][blocks][4 rows][block bytes]
  AlignedBytes scales;  // fp16 [tiles][groups][4 rows] (quantized only)
  // Asymmetric only, [tiles][groups][4 rows], rows past N are 0: fp16 when every offset is exactly
  // an fp16 value (GGUF Q4_1 stores its mins so), which halves their share of the decode stream;
  // else fp32 (a GPTQ / AWQ offset −scale·zero needs more bits than fp16 has).
  AlignedBytes offsets;
  bool offsets_f16 = false;
  int64_t code_bytes = 0, scale_bytes = 0, offset_bytes = 0;

  bool asymmetric() const { return offset_bytes > 0; }
};

// Re-lays out a checkpoint-layout weight (validated first; throws fineserve::Error when malformed).
PackedWeight pack_weight(const WeightMatrix& w);

// y[m, N] = x[m, K] · Wᵀ (+ bias[N] of bias_dtype when not null). isa: Avx2, or Avx512Vnni, which
// runs quantized weights' GEMV (m <= 3) with 512-bit vectors (the CPU must have it). threads <= 0
// uses OpenMP's default.
void linear(const PackedWeight& w, const float* x, int64_t m, const void* bias, DType bias_dtype, float* y, Isa isa,
            int threads);

// out[i, g] = Σ x[i, c] over the columns c of group g (k / groups columns each): what an
// asymmetric matrix's offsets multiply (w = scale · code + offset).
void group_sums(const float* x, int64_t m, int64_t k, int64_t groups, std::vector<float>& out);

}  // namespace fineserve::cpu
