// The CUDA backend's entry points for a build without CUDA: they say so. A CUDA build defines them
// in kernels/cuda/cuda_backend.cpp instead (kernels/CMakeLists.txt gives this library
// FINESERVE_HAVE_CUDA there), as kernels/communicator.cpp does for NCCL.
#include "kernels/base.h"
#include "kernels/cuda/cuda_backend.h"

#ifndef FINESERVE_HAVE_CUDA
namespace fineserve {

std::unique_ptr<Backend> make_cuda_backend(int, DType, const CudaOptions&) {
  throw Error("CUDA is not in this build of FineServe (it was configured without nvcc or with "
              "-DFINESERVE_CUDA=OFF); use --device cpu, or rebuild with the CUDA toolkit");
}

bool cuda_backend_built() { return false; }

}  // namespace fineserve
#endif
