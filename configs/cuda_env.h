// Environment overrides of the CUDA backend's options (read here, in configs/, and handed down):
//   FINESERVE_CUDA_POISON_WORKSPACES=1   NaN-fill GEMM and attention workspaces before each use
//                                        (scripts/gpu_check.sh's sanitizer runs; slower)
// A value it does not understand is an Error naming the variable.
#pragma once

#include "kernels/cuda/cuda_backend.h"

namespace fineserve {

CudaOptions cuda_options_from_env();

}  // namespace fineserve
