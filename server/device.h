// --device and --dtype, shared by every command that runs a model (generate, serve, eval) and by
// the benchmarks: the device spec and the backend it names.
#pragma once

#include <memory>
#include <string>

#include "kernels/backend.h"

namespace fineserve {

// A --device value: "cpu", "cuda" (GPU 0) or "cuda:N".
struct DeviceSpec {
  bool cuda = false;
  int index = 0;  // the GPU (cuda only)
  bool explicit_index = false;  // "cuda:N" rather than "cuda"
};
// Parses --device; throws fineserve::Error naming the value when it is none of the above.
DeviceSpec parse_device(const std::string& device);

// The backend for --device and --dtype: the activation dtype on CUDA, "fp16" (the default, also
// when empty) or "bf16"; the CPU computes in fp32 and takes only "" or "fp32". Throws
// fineserve::Error for a bad value, a build without CUDA, or a GPU that is not there.
std::unique_ptr<Backend> make_backend(const std::string& device, const std::string& dtype = "");

// The flag text both take, for --help.
inline constexpr const char* kDeviceHelp = "cpu, cuda (GPU 0) or cuda:N";
inline constexpr const char* kDtypeHelp = "CUDA activation dtype: fp16 (default) or bf16";

}  // namespace fineserve
