// The CPU backend: activations are fp32 host memory. By default every op runs the fast kernels of
// the best instruction set the CPU has (kernels/cpu/dispatch.h: AVX-512 VNNI, AVX2 + FMA + F16C;
// OpenMP) and the scalar reference on CPUs without AVX2. CpuOptions::isa forces one path
// (CpuOptions{.reference = true} is the reference for every op), so tests can compare the paths op
// by op. The no-argument make_cpu_backend() uses the defaults; the server and the
// benchmarks read overrides from the environment through configs/cpu_env.h and pass them here.
//
// Two options change the numerics and are off by default (docs/perplexity.md has their cost):
// int8_activations runs the quantized linear layers as integer dot products with activations
// quantized per token and block of 32 (kernels/cpu/gemm_a8.h); int8_dense_weights quantizes dense
// linear weights (the LM head) to int8 at upload.
//
// upload_weight() re-lays weights out for the fast GEMM (kernels/cpu/gemm.h): the WeightMatrix it
// returns points at that private layout and is meant only for this backend's linear(). A
// WeightMatrix that did not come from upload_weight() (checkpoint layout) is also accepted by
// linear() and runs through the reference.
#pragma once

#include <memory>
#include <optional>

#include "kernels/backend.h"
#include "kernels/cpu/dispatch.h"

namespace fineserve {

struct CpuOptions {
  bool reference = false;  // every op through cpu::ref: scalar, single-threaded, sums in double
  int threads = 0;         // OpenMP threads for the fast kernels; 0 = OpenMP's default
  // The kernel path; unset = the best this CPU runs. A path the CPU lacks is an Error at creation.
  std::optional<cpu::Isa> isa = std::nullopt;
  bool int8_activations = false;    // W4A8 / W8A8 integer linear layers (numerics change)
  bool int8_dense_weights = false;  // dense linear weights (the LM head) quantized to int8 at upload
};

std::unique_ptr<Backend> make_cpu_backend(const CpuOptions& options);

}  // namespace fineserve
