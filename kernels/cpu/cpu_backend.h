// The CPU backend: activations are fp32 host memory. By default every op runs the fast kernels
// (AVX2 + FMA + F16C, OpenMP) when the CPU has them and the scalar reference otherwise;
// CpuOptions{.reference = true} forces the reference for every op, so tests can compare the two
// backends op by op.
//
// upload_weight() re-lays weights out for the fast GEMM (kernels/cpu/gemm.h): the WeightMatrix it
// returns points at that private layout and is meant only for this backend's linear(). A
// WeightMatrix that did not come from upload_weight() (checkpoint layout) is also accepted by
// linear() and runs through the reference.
#pragma once

#include <memory>

#include "kernels/backend.h"

namespace fineserve {

struct CpuOptions {
  bool reference = false;  // every op through cpu::ref: scalar, single-threaded, sums in double
  int threads = 0;         // OpenMP threads for the fast kernels; 0 = OpenMP's default
};

std::unique_ptr<Backend> make_cpu_backend(const CpuOptions& options);

}  // namespace fineserve
