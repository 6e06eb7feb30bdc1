// --device and --dtype: which backend a command runs on.
#include "server/device.h"

#include "configs/cpu_env.h"
#include "configs/cuda_env.h"
#include "kernels/base.h"
#include "kernels/cuda/cuda_backend.h"

namespace fineserve {

DeviceSpec parse_device(const std::string& device) {
  const std::string available = cuda_backend_built() ? "cpu, cuda, cuda:N" : "cpu (this build has no CUDA)";
  DeviceSpec d;
  if (device == "cpu") return d;
  if (device == "cuda" || device.starts_with("cuda:")) {
    d.cuda = true;
    if (device == "cuda") return d;
    const std::string n = device.substr(5);
    const bool digits = !n.empty() && n.size() <= 4 && n.find_first_not_of("0123456789") == std::string::npos;
    if (!digits) throw Error("device '" + device + "': the GPU index after 'cuda:' must be a number (available: " + available + ")");
    d.index = std::stoi(n);
    d.explicit_index = true;
    return d;
  }
  throw Error("device '" + device + "' is not a device FineServe knows (available: " + available + ")");
}

std::unique_ptr<Backend> make_backend(const std::string& device, const std::string& dtype) {
  const DeviceSpec d = parse_device(device);
  if (!d.cuda) {
    if (!dtype.empty() && dtype != "fp32")
      throw Error("--dtype " + dtype + " applies to --device cuda; the CPU backend computes in fp32");
    return make_cpu_backend(cpu_options_from_env());
  }
  DType act;
  if (dtype.empty() || dtype == "fp16" || dtype == "float16") {
    act = DType::F16;
  } else if (dtype == "bf16" || dtype == "bfloat16") {
    act = DType::BF16;
  } else {
    throw Error("--dtype '" + dtype + "' is not a CUDA activation dtype (fp16 or bf16)");
  }
  if (!cuda_backend_built())
    throw Error("device '" + device + "': CUDA is not in this build of FineServe (it was configured without nvcc or "
                "with -DFINESERVE_CUDA=OFF); use --device cpu");
  try {
    return make_cuda_backend(d.index, act, cuda_options_from_env());
  } catch (const Error& e) {
    throw Error("device '" + device + "': " + e.what());
  }
}

}  // namespace fineserve
