// CUDA: FineQuant dequantization to fp16, the first CUDA op. It is the large-M path of the
// quantized GEMM (dequantize a matrix once, then a dense tensor-core GEMM) and the GPU check of
// the on-disk format. Host-callable; pointers are device memory.
#pragma once

#include <cstdint>

#include "kernels/ops.h"

namespace fineserve::cuda {

// True when a CUDA device is present and usable (tests skip otherwise).
bool device_available();

// out[rows, cols] (fp16 bit patterns) = codes * scales (+ offsets when asymmetric) for a FineQuant
// WeightMatrix whose data, scales and offsets point to device memory. Synchronous; throws fineserve::Error on a CUDA error.
void dequantize_f16(const WeightMatrix& w, uint16_t* out);

}  // namespace fineserve::cuda
