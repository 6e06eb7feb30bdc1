// The NCCL entry points of kernels/communicator.h for a build without CUDA: they say so. A CUDA
// build defines them in kernels/cuda/nccl_communicator.cpp instead (kernels/CMakeLists.txt gives
// this library FINESERVE_HAVE_CUDA there).
#include "kernels/communicator.h"

#ifndef FINESERVE_HAVE_CUDA
namespace fineserve {

namespace {
[[noreturn]] void no_nccl() {
  throw Error("NCCL tensor parallelism needs a CUDA build of FineServe; this one has no CUDA "
              "(on the CPU, --tp N runs N ranks as threads of one process)");
}
}  // namespace

std::vector<uint8_t> nccl_unique_id() { no_nccl(); }
std::unique_ptr<Communicator> make_nccl_communicator(const NcclOptions&) { no_nccl(); }
bool nccl_built() { return false; }

}  // namespace fineserve
#endif
