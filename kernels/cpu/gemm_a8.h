// The optional integer linear path (CpuOptions::int8_activations): activations quantized to int8
// per token and block of 32 columns (act_quant.h), multiplied with the int4 / int8 weight codes in
// integer dot products (W4A8 / W8A8), then scaled per block by the activation scale and per group by
// the weight scale. It changes the numerics (docs/perplexity.md has its cost), so it is an option;
// the weight-only fp32 path of gemm.h stays the default and the reference.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/gemm.h"

namespace fineserve::cpu {

// y[m, N] = x[m, K] · Wᵀ (+ bias[N] of bias_dtype when not null) with int8 activations; w must be
// quantized. isa: Avx2 or Avx512Vnni (the CPU must have it). threads <= 0 uses OpenMP's default.
void linear_int8_act(const PackedWeight& w, const float* x, int64_t m, const void* bias, DType bias_dtype, float* y,
                     Isa isa, int threads);

// A dense (F32 / F16 / BF16) weight quantized to int8 at load time (CpuOptions::int8_dense_weights,
// meant for the LM head): symmetric round-to-nearest, one fp16 scale per row and group of 64
// columns (32, or the whole row, when 64 does not divide K), codes in [-127, 127].
struct Int8Weight {
  WeightMatrix w;  // points into codes / scales
  std::vector<int8_t> codes;
  std::vector<uint16_t> scales;
};
Int8Weight quantize_dense_int8(const WeightMatrix& w);

namespace ref {
// The same numerics from the checkpoint layout, scalar, sums in double: for token i and output n,
// y = bias + Σ_groups (scale_w · Σ_blocks scale_x · Σ_block code_w · code_x
//                      + offset_w · Σ_blocks scale_x · Σ_block code_x)   (offset_w = 0 when symmetric).
void linear_int8_act(const WeightMatrix& w, const float* x, int64_t m, const void* bias, DType bias_dtype, float* y);
}  // namespace ref

}  // namespace fineserve::cpu
