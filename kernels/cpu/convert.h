// Bulk conversions between fp32 and the 16-bit float types, vectorised (F16C / AVX-512 BF16 where
// the CPU has them, chosen at run time) with the scalar kernels/half.h versions as the reference.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"

namespace fineserve::cpu {

// dst[i] = float(src[i]) for F32, F16 or BF16 sources; src may be unaligned.
void to_f32(const void* src, DType src_dtype, int64_t n, float* dst);
// dst[i] = src[i] rounded to F16 or BF16 (round to nearest even), or copied for F32.
void from_f32(const float* src, int64_t n, DType dst_dtype, void* dst);

}  // namespace fineserve::cpu
