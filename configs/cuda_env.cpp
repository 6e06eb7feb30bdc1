#include "configs/cuda_env.h"

#include <cstdlib>
#include <string>

#include "kernels/base.h"

namespace fineserve {

CudaOptions cuda_options_from_env() {
  CudaOptions o;
  if (const char* v = std::getenv("FINESERVE_CUDA_POISON_WORKSPACES"); v && *v) {
    const std::string s = v;
    if (s != "0" && s != "1") throw Error("FINESERVE_CUDA_POISON_WORKSPACES=" + s + ": expected 1 or 0");
    o.poison_workspaces = s == "1";
  }
  return o;
}

}  // namespace fineserve
